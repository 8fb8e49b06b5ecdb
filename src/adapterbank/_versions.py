"""The package versions stamped into every artifact adapterbank writes (bank cards, composition recipes,
GRASP checkpoints, evaluation results). One function, so every artifact records the same set."""

from __future__ import annotations

import platform

__all__ = ["versions"]

#: packages whose versions shape an artifact; those not installed are left out
PACKAGES = ("torch", "numpy", "safetensors", "peft", "transformers", "diffusers")


def versions() -> dict[str, str]:
    """``{package: version}`` for adapterbank, Python and :data:`PACKAGES` (the installed ones).

    Read from package metadata, not by importing: importing peft or diffusers takes seconds.

    >>> v = versions()
    >>> {"adapterbank", "python", "torch", "numpy", "safetensors"} <= set(v)
    True
    """
    from importlib.metadata import PackageNotFoundError, version  # here: `adapterbank --help` need not load it

    import adapterbank

    out = {"adapterbank": adapterbank.__version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
