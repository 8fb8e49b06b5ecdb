"""adapterbank: keep LoRA adapters in a bank with task prototypes; retrieve, weigh and merge them exactly.

The names below are imported on first use (PEP 562), so ``import adapterbank.errors`` or the command
line's ``--help`` do not pay for importing torch.

>>> import adapterbank
>>> adapterbank.LoraAdapter.__name__
'LoraAdapter'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterbank._versions import versions

if TYPE_CHECKING:
    from adapterbank.lora import LoraAdapter, LoraModule, ResidualModule, combine, truncate

__version__ = "0.1.0"

__all__ = ["LoraAdapter", "LoraModule", "ResidualModule", "combine", "truncate", "versions", "__version__"]

_LAZY = {"LoraAdapter", "LoraModule", "ResidualModule", "combine", "truncate"}  # all from adapterbank.lora (imports torch)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from adapterbank import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'adapterbank' has no attribute {name!r}")
