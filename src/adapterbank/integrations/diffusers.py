"""Prompt-level composition for diffusers pipelines: each prompt is a new task (the seed paper's image domain).

For every prompt :class:`ComposedLoRA` computes the prompt's prototype with the bank's text encoder (and, if
a reference image is given, the image's prototype in that same space, averaged in), retrieves the k nearest
LoRAs, solves for their weights, builds the exact composite Σ w_i ΔW_i and loads it into the pipeline under
one adapter name — *replacing* the previous prompt's composite (``delete_adapters`` first), never stacking
— then generates. Composites are cached per (prompt prototype, bank version, k, strategy, parameters): a
repeated prompt costs no composition.

The composite goes through the same diffusers-format file users get from ``adapterbank compose --format
diffusers`` and is loaded with the pipeline's own ``load_lora_weights``, so what the pipeline runs is what a
user would load by hand (UNet or DiT/PixArt-style transformer LoRAs, text-encoder LoRAs included).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterbank.errors import ParameterError, PrototypeSpaceError

log = logging.getLogger(__name__)

__all__ = ["ComposedLoRA", "PromptComposition"]

DEFAULT_ADAPTER_NAME = "adapterbank"


@dataclass
class PromptComposition:
    """What :class:`ComposedLoRA` did for one prompt: the prompt, its prototype, the composition and whether
    it came from the cache."""

    prompt: str
    prototype: Any
    composition: Any
    cached: bool

    def weight_table(self) -> list[tuple[str, float, float]]:
        """(LoRA id, squared prototype distance, weight) in retrieval order: which LoRAs, which weights, why."""
        return self.composition.weight_table()

    @property
    def ids(self) -> list[str]:
        return list(self.composition.ids)

    @property
    def weights(self) -> np.ndarray:
        return np.asarray(self.composition.weights)


class ComposedLoRA:
    """Compose the bank's LoRAs per prompt and run a diffusers pipeline with the composite.

    Args:
        bank: a :class:`~adapterbank.bank.Bank` of kohya/diffusers LoRAs with (description) prototypes.
        pipe: a diffusers pipeline with LoRA support (``load_lora_weights`` / ``delete_adapters``).
        k, strategy, params: retrieval size, weighting strategy (``"sparse"``, ``"sim"``, ``"auto"``, ...) and
            its parameters, as for :func:`~adapterbank.compose.compose`.
        encoder: the text encoder (an encoder or a spec); default: the one the bank recorded for its prototypes.
        image_encoder: embeds ``reference_image`` into the *same* prototype space as the prompts (a
            multimodal encoder); needed only for reference images.
        base_model, tags: retrieval filters.
        adapter_name: the name the composite is loaded under (replaced at every prompt).
        cache_size: composites kept (least recently used dropped).

    Example (``bank`` holds style LoRAs with descriptions; ``pipe`` any pipeline with LoRA support)::

        composer = ComposedLoRA(bank, pipe, k=5, strategy="sparse")
        image = composer("a watercolor fox in the snow").images[0]
        composer.last.weight_table()        # [(lora id, distance, weight), ...]
    """

    def __init__(self, bank: Any, pipe: Any, *, k: int = 5, strategy: str = "sparse",
                 params: dict[str, float] | None = None, encoder: Any = None, image_encoder: Any = None,
                 base_model: str | None = None, tags: Sequence[str] | None = None,
                 adapter_name: str = DEFAULT_ADAPTER_NAME, cache_size: int = 16) -> None:
        from adapterbank._validation import check_k

        for attr in ("load_lora_weights", "delete_adapters"):
            if not callable(getattr(pipe, attr, None)):
                raise ParameterError(f"ComposedLoRA needs a diffusers pipeline with LoRA support (it has no "
                                     f"{attr}()). Got {type(pipe).__name__}.")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ParameterError(f"adapter_name must be a non-empty string. Got {adapter_name!r}.")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ParameterError(f"cache_size must be an integer >= 1 (composites kept). Got {cache_size!r}.")
        self.bank = bank
        self.pipe = pipe
        self.k = check_k(k, "ComposedLoRA")
        self.strategy = strategy
        self.params = dict(params or {})
        self.base_model = base_model
        self.tags = list(tags) if tags else None
        self.adapter_name = adapter_name
        self.cache_size = cache_size
        self._encoder_spec = encoder
        self._encoder: Any = None
        self.image_encoder = image_encoder
        self._cache: OrderedDict[tuple[Any, ...], tuple[Any, Path]] = OrderedDict()
        self._tmp = tempfile.TemporaryDirectory(prefix="adapterbank-composed-")
        self._loaded: tuple[Any, ...] | None = None
        #: The :class:`PromptComposition` of the last prompt (``None`` before the first).
        self.last: PromptComposition | None = None

    # -- the prompt's prototype -----------------------------------------------------------------------
    @property
    def encoder(self) -> Any:
        """The text encoder (loaded on first use: the bank's recorded one unless ``encoder=`` was given)."""
        if self._encoder is None:
            from adapterbank.prototypes import load_encoder

            spec = self._encoder_spec
            if spec is None:
                specs = sorted(set(self.bank.encoders().values()))
                if len(specs) != 1:
                    raise ParameterError(
                        "ComposedLoRA: pass encoder= (the text encoder of the bank's description prototypes); the bank "
                        + ("records none." if not specs else f"records several: {specs}."))
                spec = specs[0]
            self._encoder = load_encoder(spec)
        return self._encoder

    def prototype(self, prompt: str, reference_image: Any = None) -> Any:
        """The prompt's prototype (E(prompt)); with a reference image, the mean of E(prompt) and E(image)."""
        from adapterbank.prototypes import combine_prototypes, compute_prototype, describe

        if not isinstance(prompt, str) or not prompt.strip():
            raise ParameterError(f"ComposedLoRA needs a non-empty text prompt. Got {prompt!r}.")
        p = describe(self.encoder, prompt)
        if reference_image is None:
            return p
        if self.image_encoder is None:
            raise ParameterError("A reference_image needs image_encoder= (an encoder that maps images into the "
                                 f"prompts' prototype space {p.space.key!r}).")
        q = compute_prototype(self.image_encoder, [reference_image], batch_size=1, description="reference image")
        if q.space.key != p.space.key:
            raise PrototypeSpaceError(
                f"The reference image's prototype is in space {q.space.key!r} but the prompts' is in {p.space.key!r}; "
                "image_encoder= must map images into the prompts' space (a multimodal encoder).")
        return combine_prototypes([p, q], source=f"{p.source} + reference image")

    # -- composition, cached ---------------------------------------------------------------------------
    def _key(self, proto: Any) -> tuple[Any, ...]:
        digest = hashlib.sha256(np.ascontiguousarray(proto.vector, dtype="<f4").tobytes()).hexdigest()
        return (proto.space.key, digest, self.bank.version, self.k, self.strategy,
                tuple(sorted(self.params.items())), self.base_model, tuple(self.tags or ()))

    def compose(self, prompt: str, reference_image: Any = None) -> PromptComposition:
        """The composition for ``prompt`` (from the cache when the same prompt prototype was composed before at
        this bank version and these parameters); does not touch the pipeline."""
        from adapterbank.compose import compose

        proto = self.prototype(prompt, reference_image)
        key = self._key(proto)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return PromptComposition(prompt, proto, hit[0], True)
        comp = compose(self.bank, proto, k=self.k, strategy=self.strategy, params=self.params or None,
                       base_model=self.base_model, tags=self.tags)
        self._store(key, comp)
        return PromptComposition(prompt, proto, comp, False)

    def _store(self, key: tuple[Any, ...], comp: Any) -> Path:
        """Write ``comp``'s composite as a diffusers file and cache it (dropping the least recently used)."""
        from adapterbank.formats import write_adapter

        folder = Path(self._tmp.name) / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        (f,) = [Path(p) for p in write_adapter(comp.adapter, folder, format="diffusers",
                                               base_model=comp.adapter.base_model)]
        self._cache[key] = (comp, f)
        while len(self._cache) > self.cache_size:
            _, (_, old) = self._cache.popitem(last=False)
            for p in old.parent.iterdir():
                p.unlink()
            old.parent.rmdir()
        return f

    # -- the pipeline ----------------------------------------------------------------------------------
    def apply(self, pc: PromptComposition) -> None:
        """Load ``pc``'s composite into the pipeline, replacing the previous one (never stacking)."""
        key = self._key(pc.prototype)
        if self._loaded == key:
            return
        self.unload()
        f = self._cache[key][1] if key in self._cache else self._store(key, pc.composition)  # evicted since
        self.pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=self.adapter_name)
        self._loaded = key

    def unload(self) -> None:
        """Remove the composite from the pipeline (the base weights are exactly restored)."""
        if self._loaded is not None:
            self.pipe.delete_adapters(self.adapter_name)
            self._loaded = None

    def __call__(self, prompt: str, reference_image: Any = None, **pipe_kwargs: Any) -> Any:
        """Compose for ``prompt``, load the composite, and run ``pipe(prompt=prompt, **pipe_kwargs)`` (with
        ``prompt_embeds=`` in ``pipe_kwargs`` the prompt only chooses the composite and is not passed on)."""
        pc = self.compose(prompt, reference_image)
        self.apply(pc)
        self.last = pc
        log.info("prompt %r: %s", prompt[:60], ", ".join(f"{i} {w:+.3f}" for i, _, w in pc.weight_table()))
        if "prompt_embeds" in pipe_kwargs:
            return self.pipe(**pipe_kwargs)
        return self.pipe(prompt=prompt, **pipe_kwargs)

    def close(self) -> None:
        """Unload the composite and delete the cached composite files."""
        self.unload()
        self._cache.clear()
        self._tmp.cleanup()

    def __enter__(self) -> ComposedLoRA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
