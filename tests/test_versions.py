"""One ``versions()`` (adapterbank._versions) for every artifact: bank cards, composition recipes, GRASP
checkpoints and evaluation results record the same packages."""

from __future__ import annotations

import platform
from importlib.metadata import version


def test_one_versions_function_everywhere() -> None:
    import importlib

    import adapterbank
    from adapterbank import _versions

    store = importlib.import_module("adapterbank.bank.store")
    compose_mod = importlib.import_module("adapterbank.compose.compose")  # the package's `compose` is the function
    inject = importlib.import_module("adapterbank.grasp.inject")

    assert adapterbank.versions is _versions.versions
    assert compose_mod.versions is _versions.versions and inject.versions is _versions.versions
    assert store.versions is _versions.versions
    assert not hasattr(store, "_versions")


def test_versions_is_the_union_of_what_the_artifacts_reported() -> None:
    from adapterbank import __version__, versions

    v = versions()
    # card: adapterbank numpy torch safetensors peft; recipe: + python; GRASP checkpoint: + diffusers transformers
    assert set(v) == {"adapterbank", "python", "numpy", "torch", "safetensors", "peft", "diffusers", "transformers"}
    assert v["adapterbank"] == __version__ and v["python"] == platform.python_version()
    for pkg in ("numpy", "torch", "safetensors", "peft", "diffusers", "transformers"):
        assert v[pkg] == version(pkg), pkg
