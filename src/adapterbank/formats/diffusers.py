"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` (a file, or a directory holding it).

Keys are PEFT-style with the pipeline component first: ``unet.<path>.lora_A.weight`` /
``.lora_B.weight``, ``text_encoder.…``, ``text_encoder_2.…``, ``transformer.…``. Since diffusers 0.33 the
header carries ``lora_adapter_metadata``: JSON of each component's ``LoraConfig.to_dict()`` with keys
prefixed by the component (``"unet.r"``, ``"unet.lora_alpha"``, ``"unet.rank_pattern"`` ...); diffusers
hands that dict to ``LoraConfig(**...)`` (``_create_lora_config``), so r/α/patterns follow PEFT's rules
(:mod:`adapterbank.formats._lora_config`). Without metadata diffusers uses α = r (scale 1) unless the
file holds ``<component>.<path>.alpha`` tensors (kohya-converted network alphas), which are read here too.

CLIP text-encoder paths are canonicalised to the ``text_model.…`` layout
(:func:`~adapterbank.formats._lora_config.canonical_text_encoder_path`); tensors are written with it (diffusers
strips it for flattened transformers ≥ 5 models) and the LoraConfig names modules without it, which PEFT's
suffix matching finds in both layouts.

Legacy keys are read (never written): ``unet.….processor.to_q_lora.down.weight`` / ``.up.weight``
(also ``to_k_lora``, ``to_v_lora``, ``to_out_lora`` → ``to_out.0``), ``….lora.down.weight`` and
``text_encoder.….q_proj.lora_linear_layer.down.weight`` (what ``convert_state_dict_to_diffusers`` and
diffusers' training scripts still save). They are renamed to the PEFT spelling and then follow the same
rules, metadata included, as diffusers does on load.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapterbank.errors import FormatError, UnsupportedAdapterError
from adapterbank.formats import _lora_config as lc
from adapterbank.formats.peft import member, modules_from_peft_tensors
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import LoraAdapter, LoraModule

logger = logging.getLogger(__name__)

__all__ = ["WEIGHT_NAME", "COMPONENTS", "METADATA_KEY", "read_diffusers", "write_diffusers", "diffusers_file",
           "looks_like_diffusers"]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                               "transformer_2", "prior")
_LEGACY = (
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<f>down|up)\.weight$"), "processor"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.(?P<f>down|up)\.weight$"), "linear_layer"),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<f>down|up)\.weight$"), "lora_compatible"),
)


def diffusers_file(path: str | Path) -> Path:
    """The weights file of a diffusers LoRA given as a file or a directory holding ``pytorch_lora_weights.safetensors``."""
    p = Path(path)
    if p.is_dir():
        f = member(p, WEIGHT_NAME)
        if not f.is_file():
            raise FormatError(f"The directory {p} has no {WEIGHT_NAME}.")
        return f
    return p


def looks_like_diffusers(keys: list[str]) -> bool:
    """Component-prefixed LoRA keys (PEFT-style or legacy).

    >>> looks_like_diffusers(["unet.mid_block.attentions.0.proj_in.lora_A.weight"])
    True
    """
    return bool(keys) and all(k.split(".", 1)[0] in COMPONENTS for k in keys) and any(
        ".lora_A." in k or ".lora_B." in k or "_lora." in k or ".lora_linear_layer." in k or ".lora.down." in k
        for k in keys
    )


def _component_meta(header_meta: Mapping[str, str], where: str) -> dict[str, dict[str, Any]] | None:
    raw = header_meta.get(METADATA_KEY)
    if raw is None:
        return None
    flat = lc.parse_json_object(raw, f"'{METADATA_KEY}' in {where}")
    out: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        comp, _, key = k.partition(".")
        if comp not in COMPONENTS or not key:
            raise FormatError(f"'{METADATA_KEY}' in {where} has key {k!r}; expected '<component>.<LoraConfig key>' "
                              f"with component in {COMPONENTS}.")
        out.setdefault(comp, {})[key] = v
    return out


def read_diffusers(path: str | Path, **caps: int) -> LoraAdapter:
    """Read a diffusers LoRA into a :class:`LoraAdapter` with component-prefixed module paths.

    >>> import tempfile
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 0.25, (4, 3))
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = write_diffusers(LoraAdapter({"unet.mid_block.attentions.0.proj_in": m}), d)
    >>> read_diffusers(d).modules["unet.mid_block.attentions.0.proj_in"].scale
    0.25
    """
    f = diffusers_file(path)
    where = str(f)
    tensors, header_meta = load_file(f, **caps)
    comp_meta = _component_meta(header_meta, where)
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, t in tensors.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS or not rest:
            raise FormatError(f"Tensor {key!r} in {where} does not start with a pipeline component "
                              f"({', '.join(COMPONENTS)}).")
        if "lora_magnitude_vector" in key or "dora_scale" in key:
            raise UnsupportedAdapterError(f"Tensor {key!r} in {where} is a DoRA magnitude; DoRA cannot be merged.")
        if rest.endswith(".alpha") and ".lora_" not in rest:
            lc.check_tensor_finite(t, key, where)
            if t.numel() != 1:
                raise FormatError(f"Tensor {key!r} in {where} must be a single number. Got shape {tuple(t.shape)}.")
            alphas.setdefault(comp, {})[rest[: -len(".alpha")]] = float(t.reshape(()).item())
            continue
        hit = _legacy_match(rest)
        if hit is not None:  # legacy spelling -> PEFT spelling; same config rules afterwards (as diffusers does)
            module, factor = hit
            new_key = f"{comp}.{module}.lora_{'A' if factor == 'down' else 'B'}.weight"
            if new_key in tensors or new_key in by_comp.get(comp, {}):
                raise FormatError(f"Tensor {key!r} in {where} duplicates {new_key!r}.")
            key = new_key
        by_comp.setdefault(comp, {})[key] = t
    modules: dict[str, LoraModule] = {}
    for comp, sd in by_comp.items():
        cfg = _component_config(comp, sd, comp_meta, alphas.get(comp, {}), where)
        for name, m in modules_from_peft_tensors(sd, cfg, where=where, prefix=f"{comp}.",
                                                 config_where=cfg.pop("__where__"),
                                                 check_targets=comp_meta is not None).items():
            full = f"{comp}.{lc.canonical_text_encoder_path(comp, name)}"
            if full in modules:
                raise FormatError(f"Module {full!r} appears twice in {where} (with and without 'text_model.').")
            modules[full] = m
    for comp, al in alphas.items():
        for module in al:
            if f"{comp}.{lc.canonical_text_encoder_path(comp, module)}" not in modules:
                raise FormatError(f"Tensor '{comp}.{module}.alpha' in {where} belongs to no LoRA module.")
    if not modules:
        raise FormatError(f"{where} contains no LoRA tensors.")
    meta: dict[str, Any] = {"format": "diffusers"}
    if header_meta:
        meta["file_metadata"] = dict(header_meta)
    return LoraAdapter(modules, header_meta.get("adapterbank_base_model") or None, meta)


def _legacy_match(rest: str) -> tuple[str, str] | None:
    for pat, kind in _LEGACY:
        m = pat.match(rest)
        if m:
            module = m["m"]
            if kind == "processor":
                module = f"{module}.{m['p']}" + (".0" if m["p"] == "to_out" else "")
            return module, m["f"]
    return None


def _component_config(
    comp: str,
    sd: Mapping[str, torch.Tensor],
    comp_meta: dict[str, dict[str, Any]] | None,
    alphas: Mapping[str, float],
    where: str,
) -> dict[str, Any]:
    """The LoraConfig diffusers would build for one component."""
    if comp_meta is not None:
        if comp not in comp_meta:
            raise FormatError(f"'{METADATA_KEY}' in {where} has no entries for component {comp!r}.")
        if alphas:
            raise FormatError(f"{where} has both '{METADATA_KEY}' and '.alpha' tensors for {comp!r}; diffusers "
                              "refuses that combination.")
        cfg = dict(comp_meta[comp])
        lc.check_config(cfg, f"'{METADATA_KEY}' ({comp}) in {where}")
        cfg["__where__"] = f"'{METADATA_KEY}' ({comp}.*) in {where}"
        return cfg
    # No metadata: r = α = each module's own rank, or the network alphas where given (get_peft_kwargs).
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for key, t in sd.items():
        for suffix in (".lora_B.weight", ".lora_embedding_B"):
            if key.endswith(suffix) and t.ndim >= 2:
                module = key[len(comp) + 1 : -len(suffix)]
                rank_pattern["^" + re.escape(module)] = int(t.shape[1])
                alpha_pattern["^" + re.escape(module)] = alphas.get(module, int(t.shape[1]))
    return {"r": 8, "lora_alpha": 8, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "__where__": f"{where} (no '{METADATA_KEY}': α = r unless '.alpha' tensors are present)"}


def write_diffusers(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    base_model: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``adapter`` as a diffusers LoRA with ``lora_adapter_metadata``, so ``pipe.load_lora_weights``
    applies the exact per-module scales.

    ``out`` is a directory (the file is ``pytorch_lora_weights.safetensors`` inside it) or a path ending in
    ``.safetensors``. Module paths must start with a pipeline component (``unet.``, ``text_encoder.``, ...).

    >>> import tempfile
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))
    >>> [p.name for p in write_diffusers(LoraAdapter({"unet.conv_in": m}), tempfile.mkdtemp())]
    ['pytorch_lora_weights.safetensors']
    """
    p = Path(out)
    f = p if p.suffix == ".safetensors" else p / WEIGHT_NAME
    by_comp: dict[str, dict[str, LoraModule]] = {}
    for name, m in adapter.lora_modules("writing a diffusers LoRA").items():
        comp, _, rest = name.partition(".")
        if comp not in COMPONENTS or not rest:
            raise UnsupportedAdapterError(
                f"Module {name!r} cannot be written in diffusers format: paths must start with a pipeline "
                f"component ({', '.join(COMPONENTS)})."
            )
        if m.transposed:
            raise UnsupportedAdapterError(f"Module {name!r} is transposed ({m.kind}); diffusers files cannot hold it.")
        by_comp.setdefault(comp, {})[rest] = m
    if not by_comp:
        raise FormatError("Cannot write an adapter with no modules.")
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    for comp, mods in by_comp.items():
        cfg_mods = {lc.config_path(comp, name): m for name, m in mods.items()}
        if len(cfg_mods) != len(mods):
            raise FormatError(f"Component {comp!r} has modules with and without the 'text_model.' prefix.")
        cfg = {"peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True,
               "use_dora": False, "lora_bias": False, **lc.config_for(cfg_mods)}
        packed.update({f"{comp}.{k}": v for k, v in cfg.items()})
        for name, m in mods.items():
            A, B = lc.disk_factors(m)
            tensors[f"{comp}.{name}.lora_A.weight"] = A
            tensors[f"{comp}.{name}.lora_B.weight"] = B
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    base = base_model or adapter.base_model
    if base:
        meta["adapterbank_base_model"] = base
    meta.update(dict(extra_metadata or {}))
    return [save_file(tensors, f, metadata=meta)]
