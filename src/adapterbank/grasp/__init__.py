"""GRASP: static partition of samples by external priors, one residual adapter per group in every FFN.

The whole flow on a toy denoiser (a diffusers DiT, PixArt, SD3, Sana or a transformers model works the same):

>>> import tempfile, torch
>>> from torch import nn
>>> from adapterbank import grasp
>>> class Denoiser(nn.Module):
...     def __init__(self):
...         super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
...     def forward(self, x, timestep): return x + self.ff(x)
>>> train_labels = ["cat"] * 6 + ["dog"] * 3 + ["axolotl"]
>>> part = grasp.FrequencyTiers(head=0.5, medium=0.35).fit(train_labels)
>>> part.group_names, part.assign("axolotl")
(['head', 'medium', 'tail'], 2)
>>> model = Denoiser()
>>> handle = grasp.inject(model, n_groups=part.n_groups, rank=2, seed=0)       # base frozen, U = 0
>>> data = [{"x": torch.randn(10, 3, 4), "labels": train_labels}]
>>> res = grasp.train(handle, data, objective="flow_matching", steps=2, partitioner=part, lr=1e-2)
>>> res.group_updates
[2, 2, 2]
>>> with grasp.route(model, part.assign("axolotl")):                            # every row → tail adapter
...     y = model(torch.randn(2, 3, 4), timestep=None)
>>> ckpt = handle.save(tempfile.mkdtemp(), partitioner=part)                   # safetensors + JSON (partitioner)
>>> type(grasp.group_adapter(ckpt, "tail").modules["ff"]).__name__            # ready for grasp.add_to_bank
'ResidualModule'
"""

from __future__ import annotations

from adapterbank.grasp.adapters import ACTIVATIONS, GroupLoraLinear, GroupResidual, Router
from adapterbank.grasp.baselines import FullFinetune, MoEHandle, full_finetune, moe, shared_adapter
from adapterbank.grasp.diagnostics import RoutingRecorder, adapter_norms, gradient_cosine
from adapterbank.grasp.export import add_to_bank, attach, export_group, group_adapter
from adapterbank.grasp.inject import GraspFFN, GraspHandle, find_ffn_sites, inject, load, read_checkpoint, route
from adapterbank.grasp.partition import (
    PARTITIONERS,
    ExplicitMap,
    FrequencyTiers,
    KMeansPartition,
    Partitioner,
    RandomPartition,
    labels_from_prompt,
    load_partitioner,
    partitioner_from_dict,
    tier_table,
)
from adapterbank.grasp.train import OBJECTIVES, TrainResult, apply_ema, denoising_loss, train

__all__ = [
    "ACTIVATIONS",
    "OBJECTIVES",
    "PARTITIONERS",
    "ExplicitMap",
    "FrequencyTiers",
    "FullFinetune",
    "GraspFFN",
    "GraspHandle",
    "GroupLoraLinear",
    "GroupResidual",
    "KMeansPartition",
    "MoEHandle",
    "Partitioner",
    "RandomPartition",
    "Router",
    "RoutingRecorder",
    "TrainResult",
    "adapter_norms",
    "add_to_bank",
    "apply_ema",
    "attach",
    "denoising_loss",
    "export_group",
    "find_ffn_sites",
    "full_finetune",
    "gradient_cosine",
    "group_adapter",
    "inject",
    "labels_from_prompt",
    "load",
    "load_partitioner",
    "moe",
    "partitioner_from_dict",
    "read_checkpoint",
    "route",
    "shared_adapter",
    "tier_table",
    "train",
]
