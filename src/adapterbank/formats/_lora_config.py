"""What PEFT's ``LoraConfig`` means for ΔW, shared by the PEFT and diffusers formats.

Reading: :func:`check_config` sorts every config key into one of three groups —

* keys that decide ΔW and that we implement: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
  ``alpha_pattern``, ``fan_in_fan_out``;
* keys that do not change ΔW of a saved adapter (``task_type``, ``lora_dropout``, ``target_modules``,
  ``inference_mode``, ...) — recorded or ignored;
* keys that make the adapter something other than ΔW = s·B·A on the base weights (DoRA, ``lora_bias``,
  ``modules_to_save``, trainable tokens, PiSSA/OLoRA/LoftQ inits that rewrite the base, layer replication,
  aLoRA, ...) — refused with :class:`UnsupportedAdapterError` whenever they are set.

An unknown key (from a newer PEFT) is tolerated only while its value is "off" (``None``, ``False``, ``0``,
empty); an unknown key that is switched on is refused, because we cannot know that it leaves ΔW alone.

Writing: :func:`config_for` picks ``r`` = the largest rank (multi-LoRA servers such as vLLM and LoRAX size
and check an adapter by ``r`` against their ``max_lora_rank``), ``lora_alpha`` = the most common α = s·r
(so the scale PEFT computes, α/r, is s), and ``rank_pattern`` / ``alpha_pattern`` keyed by full module
paths for the modules that differ. PEFT resolves a pattern key with ``re.match(rf"(.*\\.)?({key})$",
module)`` and takes the first key that matches; :func:`config_for` checks that every module resolves to its
own values under exactly that rule and falls back to anchored, escaped keys (``^model\\.layers\\.0...``,
the form diffusers uses) when a plain path would be ambiguous.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from adapterbank.errors import FormatError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from adapterbank.lora import LoraModule, all_finite, lora_scale

logger = logging.getLogger(__name__)

#: Keys that decide ΔW and are implemented here.
MATH_KEYS = frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"})

#: Keys that never change ΔW of a saved LoRA adapter.
HARMLESS_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "lora_dropout", "layers_to_transform",
    "layers_pattern", "megatron_core", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
})

#: Keys that must be "off"; the value is the reason given when they are not.
REFUSED_WHEN_SET: dict[str, str] = {
    "use_dora": "DoRA (use_dora) rescales the weight by a learned magnitude, so ΔW is not s·B·A",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "modules_to_save": "modules_to_save stores full replacement modules, not a LoRA ΔW",
    "trainable_token_indices": "trainable tokens replace embedding rows, not a LoRA ΔW",
    "layer_replication": "layer_replication changes the model's layer structure",
    "target_parameters": "target_parameters (LoRA on nn.Parameter, e.g. MoE experts) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "loftq_config": "LoftQ quantises and rewrites the base weights",
    "use_qalora": "QA-LoRA pools inputs before lora_A, so ΔW is not s·B·A",
    "alora_invocation_tokens": "aLoRA only activates after invocation tokens",
    "velora_config": "VeLoRA changes the training graph",
    "monteclora_config": "MonteCLoRA samples its factors",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing mixes several LoRAs at run time",
    "kasa_config": "KaSA adds a singular-value module",
    "ensure_weight_tying": "tied embedding/lm_head adapters are not supported",
}

#: init_lora_weights values that leave the base weights untouched.
SAFE_INITS: tuple[Any, ...] = (True, False, "gaussian", "eva", "orthogonal")


def is_off(v: Any) -> bool:
    """A config value that switches nothing on.

    >>> is_off(None), is_off({}), is_off(False), is_off("none"), is_off([1])
    (True, True, True, True, False)
    """
    return v is None or v is False or v == 0 or v == "none" or (isinstance(v, (str, list, dict, tuple)) and not v)


def check_config(cfg: Mapping[str, Any], where: str) -> None:
    """Refuse a LoRA config whose saved adapter is not ΔW = s·B·A on the unchanged base weights.

    >>> check_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, "x")
    >>> check_config({"peft_type": "LORA", "use_dora": True}, "x")
    Traceback (most recent call last):
    ...
    adapterbank.errors.UnsupportedAdapterError: x: 'use_dora' is set (True): DoRA (use_dora) rescales the weight by a learned magnitude, so ΔW is not s·B·A.
    """
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{where}: 'peft_type' must be 'LORA'. Got {peft_type!r} instead.")
    for key, value in cfg.items():
        if key in MATH_KEYS or key in HARMLESS_KEYS:
            continue
        if key in REFUSED_WHEN_SET:
            if not is_off(value):
                raise UnsupportedAdapterError(f"{where}: {key!r} is set ({value!r}): {REFUSED_WHEN_SET[key]}.")
            continue
        if key == "bias":
            if value not in (None, "none"):
                raise UnsupportedAdapterError(
                    f"{where}: 'bias' is {value!r}: trained base biases are saved as full tensors, not a LoRA ΔW."
                )
            continue
        if key == "init_lora_weights":
            if value not in SAFE_INITS:
                raise UnsupportedAdapterError(
                    f"{where}: 'init_lora_weights' is {value!r}, which rewrites the base weights at init; save the "
                    "adapter with path_initial_model_for_weight_conversion first."
                )
            continue
        if not is_off(value):
            raise UnsupportedAdapterError(
                f"{where}: unknown LoraConfig key {key!r} is set ({value!r}); it may change ΔW, so it is refused."
            )
        logger.debug("%s: ignoring unknown LoraConfig key %r (value %r is off)", where, key, value)
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise FormatError(f"{where}: {key!r} must be a finite number. Got {v!r} instead.")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) for k, x in v.items()
        ):
            raise FormatError(f"{where}: {key!r} must map module patterns to numbers. Got {v!r} instead.")


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """PEFT's ``peft.utils.other.get_pattern_key``: first pattern matching ``(.*\\.)?(pattern)$``.

    >>> get_pattern_key(["q_proj", "layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj")
    'q_proj'
    >>> get_pattern_key(["^v_proj"], "model.v_proj")
    'model.v_proj'
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def resolve(cfg: Mapping[str, Any], module: str) -> tuple[int | None, float | None]:
    """(r, α) that PEFT gives ``module`` under ``cfg`` (``None`` where the config has no value).

    >>> resolve({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}}, "model.layers.0.self_attn.v_proj")
    (4, 16)
    """
    rp = cfg.get("rank_pattern") or {}
    ap = cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(rp.keys(), module), cfg.get("r"))
    alpha = ap.get(get_pattern_key(ap.keys(), module), cfg.get("lora_alpha"))
    return r, alpha


def target_matches(cfg: Mapping[str, Any], module: str) -> bool:
    """PEFT's target_modules / exclude_modules test for one module (``True`` when it cannot be decided).

    >>> target_matches({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
    True
    >>> target_matches({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "a.q_proj")
    False
    """
    ex = cfg.get("exclude_modules")
    if isinstance(ex, str) and re.fullmatch(ex, module):
        return False
    if isinstance(ex, (list, tuple)) and (module in ex or any(module.endswith(f".{e}") for e in ex)):
        return False
    tm = cfg.get("target_modules")
    if tm is None or (isinstance(tm, str) and tm.lower() == "all-linear"):
        return True
    if isinstance(tm, str):
        return re.fullmatch(tm, module) is not None
    return module in tm or any(module.endswith(f".{t}") for t in tm)


# ----------------------------------------------------------------------------------------------- tensors


def check_tensor_finite(t: torch.Tensor, key: str, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``key`` and ``where`` if ``t`` holds NaN or Inf.

    (:func:`~adapterbank.lora.all_finite`: a sum first, the element-wise check only when the sum is not finite.)
    """
    if not all_finite(t):
        raise NonFiniteError(f"Tensor {key!r} in {where} contains NaN or Inf.")


def make_module(
    name: str,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float,
    kind: str,
    transposed: bool,
    where: str,
    keys: tuple[str, str],
) -> LoraModule:
    """Build a :class:`LoraModule` from on-disk factors, deriving the base weight shape from them alone.

    Linear: A (r, d_in), B (d_out, r) → weight (d_out, d_in) (or (d_in, d_out) when ``transposed``).
    Conv: A (r, C_in, *k), B (C_out, r, 1, ...) → weight (C_out, C_in, *k). Embedding: A (r, n_emb),
    B (d_emb, r) → weight (n_emb, d_emb), transposed.
    """
    ka, kb = keys
    if A.ndim < 2 or B.ndim != A.ndim:
        raise ShapeMismatchError(
            f"Module {name!r} in {where}: {ka} has shape {tuple(A.shape)} and {kb} has shape {tuple(B.shape)}; "
            "expected both 2-D (linear) or both N-D with the same N (conv)."
        )
    if A.shape[0] != B.shape[1]:
        raise ShapeMismatchError(
            f"Module {name!r} in {where}: rank of {ka} is {A.shape[0]} but {kb} has {B.shape[1]} columns "
            f"(shapes {tuple(A.shape)} and {tuple(B.shape)})."
        )
    r = int(A.shape[0])
    if r == 0:
        raise ShapeMismatchError(f"Module {name!r} in {where} has rank 0.")
    if A.ndim > 2:
        if any(int(s) != 1 for s in B.shape[2:]):
            raise UnsupportedAdapterError(
                f"Module {name!r} in {where}: {kb} has kernel {tuple(B.shape[2:])}; only 1×1 up-projections "
                "(LoRA/LoCon) are supported."
            )
        weight_shape = (int(B.shape[0]), *(int(s) for s in A.shape[1:]))
        return LoraModule(A.reshape(r, -1), B.reshape(B.shape[0], r), scale, weight_shape, False, "conv")
    if kind == "embedding":
        return LoraModule(A, B, scale, (int(A.shape[1]), int(B.shape[0])), True, "embedding")
    ws = (int(A.shape[1]), int(B.shape[0])) if transposed else (int(B.shape[0]), int(A.shape[1]))
    return LoraModule(A, B, scale, ws, transposed, "linear")


def disk_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) shaped as PEFT/kohya store them: conv factors back to (r, C_in, *k) and (C_out, r, 1, ...)."""
    if m.kind == "conv":
        k = len(m.weight_shape) - 2
        return m.A.reshape(m.rank, *m.weight_shape[1:]), m.B.reshape(m.B.shape[0], m.rank, *([1] * k))
    return m.A, m.B


# ------------------------------------------------------------------------------------------------ writing


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def config_for(modules: Mapping[str, LoraModule]) -> dict[str, Any]:
    """The ΔW-deciding part of a LoraConfig for ``modules``: r, lora_alpha, patterns, target_modules.

    ``r`` is the largest module rank, so that servers which size adapters by ``r`` (vLLM, LoRAX) never
    see a rank above it; smaller ranks go to ``rank_pattern``. α per module is s·r (``use_rslora`` is
    always False), so PEFT's α/r reproduces every scale.

    >>> import torch
    >>> m = lambda r, s: LoraModule(torch.ones(r, 3), torch.ones(2, r), s, (2, 3))
    >>> c = config_for({"a.q": m(2, 2.0), "a.k": m(2, 2.0), "a.v": m(6, 1.0)})
    >>> c["r"], c["lora_alpha"], c["rank_pattern"], c["alpha_pattern"]
    (6, 4, {'a.k': 2, 'a.q': 2}, {'a.v': 6})
    """
    if not modules:
        raise FormatError("Cannot write an adapter with no modules.")
    ranks = {k: m.rank for k, m in modules.items()}
    alphas = {k: _num(m.scale * m.rank) for k, m in modules.items()}
    r = max(ranks.values())
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = sorted(modules, key=lambda k: (-len(k), k))  # longest first: first-match semantics
    rank_pattern = {k: ranks[k] for k in names if ranks[k] != r}
    alpha_pattern = {k: alphas[k] for k in names if alphas[k] != alpha}
    cfg: dict[str, Any] = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if not _resolves_exactly(cfg, ranks, alphas):
        cfg["rank_pattern"] = {"^" + re.escape(k): v for k, v in rank_pattern.items()}
        cfg["alpha_pattern"] = {"^" + re.escape(k): v for k, v in alpha_pattern.items()}
        if not _resolves_exactly(cfg, ranks, alphas):  # pragma: no cover - anchored keys cannot collide
            raise FormatError("Could not express the per-module ranks/alphas as PEFT patterns.")
    cfg["target_modules"] = sorted(modules)
    cfg["use_rslora"] = False
    return cfg


def _resolves_exactly(cfg: Mapping[str, Any], ranks: Mapping[str, int], alphas: Mapping[str, float]) -> bool:
    # Check both the written order and sorted order (diffusers dumps its metadata with sort_keys=True).
    srt = {**cfg, "rank_pattern": dict(sorted(cfg["rank_pattern"].items())),
           "alpha_pattern": dict(sorted(cfg["alpha_pattern"].items()))}
    return _resolves_in_order(cfg, ranks, alphas) and _resolves_in_order(srt, ranks, alphas)


def _resolves_in_order(cfg: Mapping[str, Any], ranks: Mapping[str, int], alphas: Mapping[str, float]) -> bool:
    pats = {name: [(re.compile(rf"(.*\.)?({k})$"), v) for k, v in cfg[name].items()]
            for name in ("rank_pattern", "alpha_pattern")}

    def first(name: str, module: str, default: Any) -> Any:
        return next((v for rx, v in pats[name] if rx.match(module)), default)

    return all(
        first("rank_pattern", k, cfg["r"]) == ranks[k] and first("alpha_pattern", k, cfg["lora_alpha"]) == alphas[k]
        for k in ranks
    )


def parse_json_object(data: bytes | str, where: str) -> dict[str, Any]:
    """Strict JSON object: duplicate keys and non-objects raise :class:`FormatError`."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise FormatError(f"{where} contains the key {k!r} more than once.")
            out[k] = v
        return out

    try:
        obj = json.loads(data, object_pairs_hook=hook)
    except FormatError:
        raise
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where} is not valid JSON: {e}.") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where} must be a JSON object. Got {type(obj).__name__} instead.")
    return obj


def scale_from(alpha: float, r: int, rslora: bool, where: str) -> float:
    s = lora_scale(alpha, r, rslora=rslora)
    if not math.isfinite(s):
        raise NonFiniteError(f"{where}: the LoRA scale α/r = {alpha}/{r} is not finite.")
    return s


# ------------------------------------------------------------------------------------ CLIP module paths

_CLIP_ROOTS = ("encoder.layers.", "embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm")


def canonical_text_encoder_path(component: str, path: str) -> str:
    """Canonical CLIP text-encoder module path: the ``text_model.…`` layout of kohya and diffusers files.

    transformers ≥ 5 flattened ``CLIPTextModel`` (``encoder.layers.0…`` instead of
    ``text_model.encoder.layers.0…``); diffusers strips ``text_model.`` when loading into such a model.
    Adapters from both eras must name the same module the same way, so text-encoder paths that start
    like CLIP's get the ``text_model.`` prefix back. Other components and non-CLIP paths are unchanged.

    >>> canonical_text_encoder_path("text_encoder", "encoder.layers.0.self_attn.q_proj")
    'text_model.encoder.layers.0.self_attn.q_proj'
    >>> canonical_text_encoder_path("unet", "encoder.layers.0"), canonical_text_encoder_path("text_encoder_3", "encoder.block.0")
    ('encoder.layers.0', 'encoder.block.0')
    """
    if component.startswith("text_encoder") and path.startswith(_CLIP_ROOTS):
        return "text_model." + path
    return path


def config_path(component: str, path: str) -> str:
    """Module path as written in a text encoder's LoraConfig: without ``text_model.``, so that PEFT's suffix
    matching finds the module in both the flattened (transformers ≥ 5) and the nested CLIP layout.

    >>> config_path("text_encoder", "text_model.encoder.layers.0.mlp.fc1"), config_path("unet", "text_model.x")
    ('encoder.layers.0.mlp.fc1', 'text_model.x')
    """
    if component.startswith("text_encoder") and path.startswith("text_model."):
        return path[len("text_model."):]
    return path
