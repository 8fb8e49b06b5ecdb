"""kohya-ss / A1111 LoRA files: one ``.safetensors`` with ``lora_unet_…`` and ``lora_te…`` keys.

Per module stem: ``<stem>.lora_down.weight`` (r, d_in) or (r, C_in, kh, kw), ``<stem>.lora_up.weight``
(d_out, r) or (C_out, r, 1, 1), optional ``<stem>.alpha`` (0-dim, any float dtype; absent ⇒ α = r), and
ΔW = (α/r)·up@down. ``lora_A``/``lora_B`` spellings of down/up are accepted too.

Stems are module paths with ``.`` replaced by ``_``, which is lossy. Canonical module paths carry the
pipeline component first:

| kohya prefix  | component          |
|---------------|--------------------|
| ``lora_unet_``| ``unet.``          |
| ``lora_te_``  | ``text_encoder.``  |
| ``lora_te1_`` | ``text_encoder.``  |
| ``lora_te2_`` | ``text_encoder_2.``|

CLIP text-encoder paths are canonicalised to the ``text_model.…`` layout (see
:func:`~adapterbank.formats._lora_config.canonical_text_encoder_path`), also for ``module_names`` taken
from a flattened transformers ≥ 5 ``CLIPTextModel``.

With ``module_names`` (the real dotted module names of the target components, component-prefixed, e.g.
``["unet." + n for n, _ in unet.named_modules()]``) each stem is mapped back exactly. Without it a
deterministic parser splits the stem on ``_`` and re-joins the known multi-word segments of SD1.x/2.x
diffusers UNets and CLIP text encoders (:data:`SEGMENTS`); anything else — including SDXL's LDM-style
``input_blocks_4_1_…`` names — raises :class:`FormatError` asking for ``module_names``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from adapterbank.errors import FormatError, KohyaTextEncoderWarning, ShapeMismatchError, UnsupportedAdapterError
from adapterbank.formats import _lora_config as lc
from adapterbank.formats.safetensors_io import load_file, save_file
from adapterbank.lora import LoraAdapter, LoraModule

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "SEGMENTS", "KohyaTextEncoderWarning", "read_kohya", "write_kohya", "stem_to_path",
           "is_kohya_key"]


#: kohya key prefix -> component; the order matters for matching (te1/te2 before te).
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)

#: Module-name segments that contain ``_`` (SD1.x/2.x diffusers UNet, CLIP text model). Single words and
#: digits need no entry.
SEGMENTS: frozenset[str] = frozenset({
    # UNet2DConditionModel
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k",
    "to_v", "to_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding", "linear_1",
    "linear_2", "conv_norm_out", "add_embedding", "class_embedding", "add_k_proj", "add_v_proj", "add_q_proj",
    "to_add_out", "encoder_hid_proj", "time_proj",
    # CLIPTextModel / CLIPTextModelWithProjection
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "token_embedding",
    "position_embedding", "text_projection", "layer_norm1", "layer_norm2",
})
_MAX_SEG = max(s.count("_") + 1 for s in SEGMENTS)
_WORDS: frozenset[str] = frozenset({
    "attentions", "resnets", "downsamplers", "upsamplers", "conv", "conv1", "conv2", "ff", "net", "proj",
    "attn1", "attn2", "norm", "norm1", "norm2", "norm3", "encoder", "layers", "mlp", "fc1", "fc2", "embeddings",
})
_LDM_HINTS = ("input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers",
              "skip_connection", "label_emb", "time_embed")

_FACTORS = {
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".alpha": "alpha",
}
_UNSUPPORTED_MARKERS = {  # substrings of the key
    "dora_scale": "DoRA (dora_scale)",
    ".hada_": "LyCORIS LoHa (hada_*)",
    ".lokr_": "LyCORIS LoKr (lokr_*)",
    ".lora_mid.": "LoCon/Tucker mid factor (lora_mid)",
}
_UNSUPPORTED_SUFFIXES = {
    ".diff": "LyCORIS full weight difference (.diff)",
    ".diff_b": "LyCORIS bias difference (.diff_b)",
    ".bias": "a bias tensor",
    ".scale": "a per-module scale tensor",
}


def is_kohya_key(key: str) -> bool:
    """``True`` for keys that start with one of the kohya component prefixes.

    >>> is_kohya_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"), is_kohya_key("unet.x")
    (True, False)
    """
    return any(key.startswith(p) for p, _ in COMPONENTS)


def _split_prefix(stem: str) -> tuple[str, str, str]:
    for prefix, comp in COMPONENTS:
        if stem.startswith(prefix):
            return prefix, comp, stem[len(prefix):]
    raise FormatError(f"{stem!r} does not start with a kohya prefix ({', '.join(p for p, _ in COMPONENTS)}).")


def stem_to_path(stem: str) -> str:
    """Rule-based inverse of kohya's ``.``→``_`` for SD1.x/2.x UNet and CLIP module names.

    >>> stem_to_path("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0")
    'unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0'
    >>> stem_to_path("lora_te2_text_model_encoder_layers_11_self_attn_q_proj")
    'text_encoder_2.text_model.encoder.layers.11.self_attn.q_proj'
    """
    _, comp, body = _split_prefix(stem)
    tokens = body.split("_")
    segs: list[str] = []
    i = 0
    while i < len(tokens):
        for k in range(min(_MAX_SEG, len(tokens) - i), 0, -1):
            cand = "_".join(tokens[i : i + k])
            if cand in SEGMENTS or (k == 1 and (cand.isdigit() or cand in _WORDS)):
                segs.append(cand)
                i += k
                break
        else:
            hint = ""
            if any(h in body for h in _LDM_HINTS):
                hint = " It looks like an SDXL/LDM-style (sgm) name;"
            raise FormatError(
                f"Cannot map the kohya module name {stem!r} to a module path (stuck at {tokens[i]!r}).{hint} "
                "Pass module_names (the target model's real dotted module names, component-prefixed) to map it "
                "exactly."
            )
    return f"{comp}." + ".".join(segs)


def _names_map(module_names: Iterable[str]) -> dict[str, str]:
    """kohya stem -> real module path, from component-prefixed dotted names."""
    by_stem: dict[str, str] = {}
    clashes: dict[str, set[str]] = {}
    comp_prefix = {comp: prefix for prefix, comp in COMPONENTS}
    comp_prefix["text_encoder"] = "lora_te_"
    for name in module_names:
        if not isinstance(name, str):
            raise FormatError(f"module_names must be strings. Got {type(name).__name__} instead.")
        comp, _, rest = name.partition(".")
        if not rest or comp not in comp_prefix:
            continue
        rest = lc.canonical_text_encoder_path(comp, rest)
        name = f"{comp}.{rest}"
        prefixes = [comp_prefix[comp]] + (["lora_te1_"] if comp == "text_encoder" else [])
        for prefix in prefixes:
            stem = prefix + rest.replace(".", "_")
            if stem in by_stem and by_stem[stem] != name:
                clashes.setdefault(stem, {by_stem[stem]}).add(name)
            by_stem[stem] = name
    for stem, names in clashes.items():
        by_stem[stem] = "\x00" + ", ".join(sorted(names))  # marked ambiguous
    return by_stem


def read_kohya(
    path: str | Path, *, module_names: Iterable[str] | None = None, **caps: int
) -> LoraAdapter:
    """Read a kohya/A1111 LoRA ``.safetensors`` file into a :class:`LoraAdapter` with canonical paths.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "l.safetensors"
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 0.5, (4, 3))
    >>> _ = write_kohya(LoraAdapter({"unet.mid_block.attentions.0.proj_in": m}), p)
    >>> a = read_kohya(p)
    >>> list(a.modules), a.modules["unet.mid_block.attentions.0.proj_in"].scale
    (['unet.mid_block.attentions.0.proj_in'], 0.5)
    """
    p = Path(path)
    tensors, header_meta = load_file(p, **caps)
    where = str(p)
    names = _names_map(module_names) if module_names is not None else None
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        what = next((w for m, w in _UNSUPPORTED_MARKERS.items() if m in key), None) or next(
            (w for m, w in _UNSUPPORTED_SUFFIXES.items() if key.endswith(m)), None)
        if what is not None and is_kohya_key(key):
            raise UnsupportedAdapterError(f"Tensor {key!r} in {where} is {what}; only plain LoRA/LoCon is supported.")
        if not is_kohya_key(key):
            raise FormatError(
                f"Tensor {key!r} in {where} is not a kohya LoRA key (expected lora_unet_…, lora_te_…, lora_te1_…, "
                "lora_te2_…)."
            )
        for suffix, factor in _FACTORS.items():  # noqa: B007 (used after the loop)
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                break
        else:
            raise FormatError(f"Tensor {key!r} in {where} is not a kohya LoRA key we understand.")
        if "." in stem:
            raise FormatError(f"Tensor {key!r} in {where} has a '.' inside its module name {stem!r}.")
        slot = parts.setdefault(stem, {})
        if factor in slot:
            raise FormatError(f"Tensor {key!r} in {where} repeats the {factor} of {stem!r} (as {slot[factor][0]!r}).")
        slot[factor] = (key, t)
    modules: dict[str, LoraModule] = {}
    alphas: dict[str, float] = {}
    for stem, slot in parts.items():
        if "A" not in slot or "B" not in slot:
            missing = "lora_down" if "A" not in slot else "lora_up"
            raise FormatError(f"Module {stem!r} in {where} has no {missing}.weight tensor.")
        try:
            path_ = _resolve(stem, names, where)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        if path_ in modules:
            raise FormatError(f"Two kohya modules in {where} map to the same module {path_!r} (second: {stem!r}).")
        (ka, A), (kb, B) = slot["A"], slot["B"]
        lc.check_tensor_finite(A, ka, where)
        lc.check_tensor_finite(B, kb, where)
        r = int(A.shape[0]) if A.ndim else 0
        if "alpha" in slot:
            kal, at = slot["alpha"]
            if at.numel() != 1 or not at.is_floating_point() and at.dtype not in (torch.int32, torch.int64):
                raise FormatError(f"Tensor {kal!r} in {where} must be a single number. Got shape {tuple(at.shape)}.")
            lc.check_tensor_finite(at, kal, where)
            alpha = float(at.reshape(()).item())
        else:
            alpha = float(r)
        scale = lc.scale_from(alpha, r, False, f"Module {stem!r} in {where}") if r else 0.0
        modules[path_] = lc.make_module(path_, A, B, scale=scale, kind="linear", transposed=False, where=where,
                                        keys=(ka, kb))
        alphas[path_] = alpha
    if not modules:
        raise FormatError(f"{where} contains no LoRA tensors.")
    meta: dict[str, Any] = {"format": "kohya"}
    if header_meta:
        meta["file_metadata"] = dict(header_meta)
    base = header_meta.get("adapterbank_base_model") or None
    return LoraAdapter(modules, base, meta)


def _resolve(stem: str, names: Mapping[str, str] | None, where: str) -> str:
    if names is None:
        comp, _, rest = stem_to_path(stem).partition(".")
        return f"{comp}.{lc.canonical_text_encoder_path(comp, rest)}"
    got = names.get(stem)
    if got is None:
        raise FormatError(f"The kohya module {stem!r} in {where} matches none of the given module_names.")
    if got.startswith("\x00"):
        raise FormatError(f"The kohya module {stem!r} in {where} is ambiguous: it matches {got[1:]}.")
    return got


def write_kohya(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    base_model: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    uniform_alpha: bool = True,
) -> list[Path]:
    """Write ``adapter`` as one kohya/A1111 ``.safetensors`` file (down/up/alpha, α as fp32 0-dim).

    With ``uniform_alpha`` (default) every module gets the same α (the most common s·r) and the rest of
    its scale is folded into ``lora_up``: diffusers' kohya converter loses per-module alphas of attention
    and text-encoder modules (its ``alpha_pattern`` keys keep the ``processor.to_q_lora…`` spelling), so
    mixed alphas would load with wrong scales there. ΔW is unchanged; modules whose s·r equals that α keep
    their factors bit for bit. ``uniform_alpha=False`` writes α = s·r per module.

    Module paths must start with ``unet.``, ``text_encoder.`` or ``text_encoder_2.``; transposed modules
    (GPT-2 Conv1D, embeddings) have no kohya form and are refused.

    >>> import tempfile
    >>> m = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0, (4, 3))
    >>> [p.name for p in write_kohya(LoraAdapter({"unet.conv_in": m}), Path(tempfile.mkdtemp()) / "a.safetensors")]
    ['a.safetensors']
    """
    p = Path(out)
    mods = adapter.lora_modules("writing a kohya file")
    te2 = any(k.startswith("text_encoder_2.") for k in mods)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if te2 else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    products = Counter(float(m.scale) * m.rank for m in mods.values() if m.scale != 0)
    common = products.most_common(1)[0][0] if products else 1.0
    for name, m in mods.items():
        comp, _, rest = name.partition(".")
        if comp not in prefixes or not rest:
            raise UnsupportedAdapterError(
                f"Module {name!r} cannot be written in kohya format: paths must start with a pipeline component "
                "(unet., text_encoder. or text_encoder_2.)."
            )
        if m.transposed:
            raise UnsupportedAdapterError(f"Module {name!r} is transposed ({m.kind}); kohya files cannot hold it.")
        stem = prefixes[comp] + rest.replace(".", "_")
        if stem in seen:
            raise ShapeMismatchError(f"Modules {seen[stem]!r} and {name!r} have the same kohya name {stem!r}.")
        seen[stem] = name
        A, B = lc.disk_factors(m)
        alpha = float(m.scale) * m.rank
        if uniform_alpha and alpha != common:
            B = B * (alpha / common)  # fold: (common/r)·(B·alpha/common)·A = s·B·A
            alpha = common
        tensors[f"{stem}.lora_down.weight"] = A
        tensors[f"{stem}.lora_up.weight"] = B
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not tensors:
        raise FormatError("Cannot write an adapter with no modules.")
    alphas = {float(t.item()) for k, t in tensors.items() if k.endswith(".alpha")}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(m.rank for m in mods.values())),
        "ss_network_alpha": repr(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
    }
    base = base_model or adapter.base_model
    if base:
        meta["adapterbank_base_model"] = base
    meta.update(dict(extra_metadata or {}))
    _warn_text_encoder(adapter, p)
    return [save_file(tensors, p, metadata=meta)]


def _warn_text_encoder(adapter: LoraAdapter, out: Path) -> None:
    te = [k for k in adapter.modules if k.startswith("text_encoder")]
    if not te:
        return
    msg = (f"{out}: writing {len(te)} text-encoder LoRA module(s) (e.g. {te[0]!r}) in kohya format. diffusers' own "
           "kohya loader (pipe.load_lora_weights) mishandles text-encoder attention LoRAs (it renames their keys and "
           "loses their per-module alphas, so they can load with wrong scales or not at all; a diffusers bug). For diffusers, write "
           "--format diffusers (format='diffusers') instead; kohya/A1111 tools read this file correctly.")
    logger.warning("%s", msg)
    warnings.warn(msg, KohyaTextEncoderWarning, stacklevel=3)
