"""Encoders and task prototypes (Eq. 1): p_T = (1/|D_T|) Σ_{x∈D_T} E(x), streamed and batched."""

from __future__ import annotations

from adapterbank.prototypes.compute import combine_prototypes, compute_prototype, describe
from adapterbank.prototypes.encoders import (
    DEFAULT_TEXT_ENCODER_ID,
    CallableEncoder,
    Encoder,
    HFTextEncoder,
    HFVisionEncoder,
    SentenceTransformerEncoder,
    default_text_encoder,
    default_text_model_path,
    detect_kind,
    is_encoder,
    load_encoder,
    model_fingerprint,
)
from adapterbank.prototypes.inputs import describe_source, iter_batches, iter_items
from adapterbank.prototypes.space import Prototype, PrototypeSpace, check_same_space

__all__ = [
    "Prototype",
    "PrototypeSpace",
    "check_same_space",
    "compute_prototype",
    "describe",
    "combine_prototypes",
    "Encoder",
    "HFTextEncoder",
    "HFVisionEncoder",
    "SentenceTransformerEncoder",
    "CallableEncoder",
    "load_encoder",
    "default_text_encoder",
    "default_text_model_path",
    "detect_kind",
    "is_encoder",
    "model_fingerprint",
    "DEFAULT_TEXT_ENCODER_ID",
    "iter_batches",
    "iter_items",
    "describe_source",
]
