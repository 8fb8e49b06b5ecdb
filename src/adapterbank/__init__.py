"""adapterbank: keep LoRA adapters in a bank with task prototypes; retrieve, weigh and merge them exactly."""

from __future__ import annotations

from adapterbank._versions import versions
from adapterbank.lora import LoraAdapter, LoraModule, combine, truncate

__version__ = "0.1.0"

__all__ = ["LoraAdapter", "LoraModule", "combine", "truncate", "versions", "__version__"]
