"""compute_prototype / describe / combine_prototypes: Eq. 1 streamed, errors, spaces, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapterbank.errors import EncoderError, NonFiniteError, PrototypeSpaceError
from adapterbank.prototypes import (
    CallableEncoder,
    HFTextEncoder,
    Prototype,
    PrototypeSpace,
    combine_prototypes,
    compute_prototype,
    describe,
)


def hashed_features(items: list[str]) -> np.ndarray:
    """A deterministic 8-d feature per text (seeded by the text's bytes); no shared state."""
    out = []
    for t in items:
        seed = int.from_bytes(t.encode()[:8].ljust(8, b"\0"), "little") ^ len(t)
        out.append(np.random.default_rng(seed).standard_normal(8))
    return np.array(out)


TEXTS = [f"sample text {i} " + "word " * (i % 7) for i in range(45)]


@pytest.fixture
def enc() -> CallableEncoder:
    return CallableEncoder(hashed_features, name="hashed", revision="1")


def test_prototype_is_the_mean_whatever_the_batching(enc: CallableEncoder) -> None:
    ref = hashed_features(TEXTS).mean(0)
    one = compute_prototype(enc, TEXTS, batch_size=len(TEXTS))
    np.testing.assert_allclose(one.vector, ref, atol=1e-6, rtol=0)
    for bs in (1, 2, 7, 32):
        p = compute_prototype(enc, TEXTS, batch_size=bs)
        np.testing.assert_allclose(p.vector, one.vector, atol=1e-6, rtol=0)
        assert p.n_samples == 45
    lim = compute_prototype(enc, iter(TEXTS), batch_size=4, limit=10)
    np.testing.assert_allclose(lim.vector, hashed_features(TEXTS[:10]).mean(0), atol=1e-6, rtol=0)
    assert lim.n_samples == 10 and lim.source == "list_iterator of items"


def test_batches_never_exceed_batch_size(enc: CallableEncoder) -> None:
    sizes: list[int] = []

    def spy(items: list[str]) -> np.ndarray:
        sizes.append(len(items))
        return hashed_features(items)

    compute_prototype(CallableEncoder(spy, name="spy"), TEXTS, batch_size=8)
    assert max(sizes) == 8 and sum(sizes) == 45


def test_tiny_bert_batch_boundaries_and_files(tiny_bert_dir: Path, tmp_path: Path) -> None:
    texts = ["the cat sat", "hello world", "a legal contract summary", "dog", "python code returns a list of numbers"]
    enc = HFTextEncoder(tiny_bert_dir)
    whole = compute_prototype(enc, texts, batch_size=len(texts))
    for bs in (1, 2, 3):
        np.testing.assert_allclose(compute_prototype(enc, texts, batch_size=bs).vector, whole.vector, atol=1e-6, rtol=0)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"sentence": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    from_file = compute_prototype(enc, f, batch_size=2, progress=False)
    np.testing.assert_allclose(from_file.vector, whole.vector, atol=1e-6, rtol=0)
    assert from_file.source == str(f)


def test_empty_input_is_refused(enc: CallableEncoder, tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="No samples in 0 inline items"):
        compute_prototype(enc, [])
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(EncoderError, match="No samples in .*e.jsonl"):
        compute_prototype(enc, tmp_path / "e.jsonl")
    empty_dir = tmp_path / "imgs"
    empty_dir.mkdir()
    with pytest.raises(EncoderError, match="No samples"):
        compute_prototype(enc, empty_dir)
    with pytest.raises(EncoderError, match="non-empty text description"):
        describe(enc, "  ")


def test_nan_output_names_the_sample(enc: CallableEncoder) -> None:
    def nan_on_7(items: list[str]) -> np.ndarray:
        f = hashed_features(items)
        f[[i for i, t in enumerate(items) if t == "bad 7"], 3] = np.nan
        return f

    items = [f"ok {i}" for i in range(7)] + ["bad 7"] + [f"ok {i}" for i in range(8, 12)]
    with pytest.raises(NonFiniteError, match="NaN or Inf for sample 7 of 12 inline items"):
        compute_prototype(CallableEncoder(nan_on_7, name="nan"), items, batch_size=3)
    inf = CallableEncoder(lambda xs: np.full((len(xs), 2), np.inf), name="inf")
    with pytest.raises(NonFiniteError):
        describe(inf, "anything at all")


def test_mixing_spaces_is_refused(enc: CallableEncoder) -> None:
    a = compute_prototype(enc, TEXTS[:5])
    other = CallableEncoder(hashed_features, name="hashed", revision="2")  # same fn, other revision
    b = compute_prototype(other, TEXTS[5:9])
    with pytest.raises(PrototypeSpaceError, match="hashed@1.*hashed@2"):
        combine_prototypes([a, b])
    with pytest.raises(PrototypeSpaceError):
        a.distance2(b)
    with pytest.raises(PrototypeSpaceError):
        compute_prototype(other, TEXTS[:3], space=a.space)
    norm = CallableEncoder(hashed_features, name="hashed", revision="1", normalize=True)
    with pytest.raises(PrototypeSpaceError, match=r"\|l2\|"):
        combine_prototypes([a, compute_prototype(norm, TEXTS[:2])])


def test_combine_equals_one_pass(enc: CallableEncoder) -> None:
    parts = [compute_prototype(enc, TEXTS[i:j]) for i, j in ((0, 10), (10, 11), (11, 45))]
    both = combine_prototypes(parts)
    np.testing.assert_allclose(both.vector, compute_prototype(enc, TEXTS).vector, atol=1e-6, rtol=0)
    assert both.n_samples == 45
    with pytest.raises(EncoderError, match="n_samples=0"):
        combine_prototypes([Prototype(np.zeros(8), enc.space)])


def test_describe_and_save_load_round_trip(enc: CallableEncoder, tmp_path: Path) -> None:
    d = describe(enc, "translate French legal contracts")
    np.testing.assert_allclose(d.vector, hashed_features(["translate French legal contracts"])[0], atol=1e-6)
    assert d.n_samples == 1 and d.source == "description: translate French legal contracts"
    path = d.save(tmp_path / "proto")
    back = Prototype.load(path)
    assert back.space == d.space and back.n_samples == 1 and back.source == d.source
    np.testing.assert_array_equal(back.vector, d.vector)
    assert back.extra["description"] == "translate French legal contracts"
    with pytest.raises(PrototypeSpaceError):
        Prototype.load(path, space=PrototypeSpace("hashed", "1", "callable", True, 8))


def test_progress_bar_writes_to_stderr_only_when_asked(enc: CallableEncoder, capsys: pytest.CaptureFixture) -> None:
    compute_prototype(enc, TEXTS, batch_size=5)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    compute_prototype(enc, TEXTS, batch_size=5, progress=True)
    loud = capsys.readouterr()
    assert loud.out == "" and "45" in loud.err
