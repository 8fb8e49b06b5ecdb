"""Group adapters out of a GRASP checkpoint: as :class:`LoraAdapter` objects, files, and bank entries.

A residual group adapter becomes a :class:`LoraAdapter` of :class:`~adapterbank.lora.ResidualModule` s
(D_g, U_g, scale s, φ, channel axis) saved in the ``grasp_residual`` format; the bank's ``compose`` then
combines groups exactly by concatenation, U* = [w_1 s_1 U_1 … w_k s_k U_k], D* = [D_1; …; D_k]
(:func:`adapterbank.lora.combine`); a residual module has no ΔW, so SVD truncation and dense merging refuse
it. A ``kind="lora"`` group adapter is an ordinary LoRA on the FFN linears and is written as PEFT
(``PeftModel.from_pretrained`` loads it).

:func:`add_to_bank` is the one bridge from GRASP to a bank: the bank itself knows nothing of GRASP.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adapterbank.errors import FormatError, ParameterError, ShapeMismatchError, UnknownNameError
from adapterbank.grasp.inject import GraspHandle, inject, read_checkpoint
from adapterbank.lora import AdapterModule, LoraAdapter, LoraModule, ResidualModule

if TYPE_CHECKING:
    from adapterbank.bank import Bank, Card

logger = logging.getLogger(__name__)

__all__ = ["add_to_bank", "attach", "export_group", "group_adapter", "group_ids"]


def _source(handle_or_ckpt: GraspHandle | str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(handle_or_ckpt, GraspHandle):
        h = handle_or_ckpt
        cfg = {**h.config, "sites": [s.to_dict() for s in h.sites], "group_names": h.group_names}
        return cfg, h.state_dict()
    return read_checkpoint(handle_or_ckpt)


def group_ids(cfg_or_handle: Any, group: int | str) -> int:
    names = cfg_or_handle.group_names if isinstance(cfg_or_handle, GraspHandle) else cfg_or_handle["group_names"]
    if isinstance(group, str):
        if group not in names:
            raise UnknownNameError(f"Unknown group {group!r}. Valid groups: {', '.join(names)}.")
        return names.index(group)
    if not isinstance(group, int) or not 0 <= group < len(names):
        raise UnknownNameError(f"Group {group!r} does not exist; groups are 0..{len(names) - 1} ({names}).")
    return group


def group_adapter(handle_or_ckpt: GraspHandle | str | Path, group: int | str, *, base_model: str | None = None,
                  ) -> LoraAdapter:
    """Group ``group``'s adapter as a :class:`LoraAdapter` (residual modules, or LoRA modules for kind="lora").

    >>> from torch import nn
    >>> from adapterbank.grasp import inject
    >>> class B(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    >>> a = group_adapter(inject(B(), n_groups=2, rank=2, seed=0), 1)
    >>> type(a.modules["ff"]).__name__, a.modules["ff"].D.shape
    ('ResidualModule', torch.Size([2, 4]))
    """
    cfg, t = _source(handle_or_ckpt)
    g = group_ids(cfg, group)
    mods: dict[str, AdapterModule] = {}
    if cfg["kind"] == "residual":
        if cfg["activation"] != "gelu":
            raise FormatError(f"Only φ = GELU residual adapters can be exported (the bank's residual kind); this "
                              f"checkpoint uses activation {cfg['activation']!r}.")
        for s in cfg["sites"]:
            D, U = t[f"{s['name']}.down.{g}"], t[f"{s['name']}.up.{g}"]
            mods[s["name"]] = ResidualModule(D.detach().clone(), U.detach().clone(), float(cfg["scale"]),
                                             cfg["activation"], int(s["channel_dim"]))
    else:
        scale = float(cfg["lora_alpha"]) / int(cfg["rank"])
        for key in sorted(t):
            if key.endswith(f".lora_A.{g}"):
                mod = key[: -len(f".lora_A.{g}")]
                A, B = t[key], t[f"{mod}.lora_B.{g}"]
                mods[mod] = LoraModule(A.detach().clone(), B.detach().clone(), scale, (B.shape[0], A.shape[1]))
    if not mods:
        raise FormatError(f"No adapter tensors found for group {g}.")
    meta: dict[str, Any] = {"grasp_group": cfg["group_names"][g], "grasp_group_id": g}
    return LoraAdapter(mods, base_model or cfg.get("base_model"), meta)


def export_group(handle_or_ckpt: GraspHandle | str | Path, group: int | str, out: str | Path, *,
                 base_model: str | None = None) -> list[Path]:
    """Write group ``group``'s adapter: ``grasp_residual`` folder (residual) or PEFT folder (kind="lora").

    >>> import tempfile
    >>> from adapterbank.grasp import inject
    >>> class B(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    >>> [p.name for p in export_group(inject(B(), n_groups=2, rank=2), 1, tempfile.mkdtemp())]
    ['grasp_residual.json', 'grasp_residual.safetensors']
    """
    from adapterbank.formats import write_adapter

    a = group_adapter(handle_or_ckpt, group, base_model=base_model)
    residual = isinstance(next(iter(a.modules.values())), ResidualModule)
    return write_adapter(a, out, format="grasp_residual" if residual else "peft", base_model=base_model)


def add_to_bank(
    bank: Bank,
    ckpt: str | Path,
    samples_or_prototypes: Mapping[int | str, Any],
    *,
    encoder: Any = None,
    id_prefix: str = "grasp",
    base_model: str | None = None,
    tags: Sequence[str] = (),
    description: str | None = None,
    replace: bool = False,
    batch_size: int = 32,
) -> list[Card]:
    """Add every group adapter of checkpoint ``ckpt`` to ``bank`` with its group prototype; returns the cards.

    ``samples_or_prototypes`` maps a group (id or name) to a :class:`~adapterbank.prototypes.Prototype` or
    to the group's samples/prompts, whose mean ``encoder`` feature (Eq. 1) becomes the prototype. Groups
    missing from the mapping are added without a prototype. Ids are ``<id_prefix>-<group name>``.
    Residual group adapters are stored in the ``grasp_residual`` format and compose exactly with
    :func:`adapterbank.compose.compose`; ``kind="lora"`` groups are stored as PEFT adapters.

    Example::

        cards = grasp.add_to_bank(bank, "grasp-ckpt/", {"tail": tail_prompts}, encoder=enc)
    """
    from adapterbank.prototypes import Prototype, compute_prototype

    cfg, _ = read_checkpoint(ckpt)
    names = cfg["group_names"]
    protos: dict[int, Any] = {}
    for key, val in samples_or_prototypes.items():
        g = group_ids(cfg, key)
        if isinstance(val, Prototype):
            protos[g] = val
        else:
            if encoder is None:
                raise ParameterError(f"Group {names[g]!r} was given samples, not a Prototype: pass encoder=...")
            protos[g] = compute_prototype(encoder, list(val), batch_size=batch_size,
                                          description=f"GRASP group {names[g]} of {Path(ckpt).name}")
    cards: list[Card] = []
    with tempfile.TemporaryDirectory(prefix="adapterbank-grasp-") as tmp:
        for g, name in enumerate(names):
            out = Path(tmp) / f"g{g}"
            export_group(ckpt, g, out, base_model=base_model)
            fmt = "grasp_residual" if cfg["kind"] == "residual" else "peft"
            cards.append(bank.add(out, id=f"{id_prefix}-{name}", prototype=protos.get(g), format=fmt,
                                  tags=["grasp", f"grasp-group:{name}", *tags], base_model=base_model,
                                  description=description or f"GRASP {cfg['kind']} adapter of group {name!r} "
                                  f"({len(cfg['sites'])} FFN sites, rank {cfg['rank']})", replace=replace))
            logger.info("added GRASP group %s as %s", name, cards[-1].id)
    return cards


def attach(model: nn.Module, adapter: LoraAdapter, **kw: Any) -> GraspHandle:
    """Apply a residual :class:`LoraAdapter` (e.g. a bank composition of groups) to ``model`` as one group.

    Use ``with grasp.route(model, 0):`` to switch it on; ``handle.remove()`` restores the model.

    >>> from adapterbank.grasp import inject, route
    >>> from adapterbank.lora import combine
    >>> class B(nn.Module):
    ...     def __init__(self): super().__init__(); self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    ...     def forward(self, x): return self.ff(x)
    >>> h = inject(B(), n_groups=2, rank=2, seed=0)
    >>> both = combine([group_adapter(h, 0), group_adapter(h, 1)], [0.5, 0.5])   # exact: rank 4
    >>> _ = h.remove(); h2 = attach(h.model, both)
    >>> h2.config["rank"]
    4
    """
    mods = {k: m for k, m in adapter.modules.items() if isinstance(m, ResidualModule)}
    if not mods or len(mods) != len(adapter.modules):
        raise FormatError("attach() takes an adapter of GRASP residual modules (ResidualModule); this one holds "
                          "LoRA weight updates (load those with PEFT).")
    ranks = {m.rank for m in mods.values()}
    if len(ranks) != 1:
        raise ShapeMismatchError(f"attach() needs one rank at every site. Got ranks {sorted(ranks)}.")
    h = inject(model, n_groups=1, rank=ranks.pop(), targets=list(mods), **kw)
    try:
        for s in h.sites:
            m = mods[s.name]
            if (s.d_out, s.d_in) != (m.d_out, m.d_in):
                raise ShapeMismatchError(f"Site {s.name!r} is {s.d_in}→{s.d_out} but the adapter module is "
                                         f"{m.d_in}→{m.d_out}.")
            with torch.no_grad():
                s.adapter.down[0].copy_(m.D)  # type: ignore[union-attr, index]
                s.adapter.up[0].copy_(m.U)  # type: ignore[union-attr, index]
            s.adapter.scale = float(m.scale)  # type: ignore[union-attr]
    except Exception:
        h.remove()
        raise
    return h
