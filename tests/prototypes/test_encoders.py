"""Encoders: tiny BERT and ViT built from configs, SAM's vision encoder, callables, load_encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterbank.errors import EncoderError, ParameterError, ShapeMismatchError, UnknownNameError
from adapterbank.prototypes import (
    CallableEncoder,
    HFTextEncoder,
    HFVisionEncoder,
    compute_prototype,
    detect_kind,
    load_encoder,
    model_fingerprint,
)

TEXTS = ["the cat sat on the mat", "hello world", "legal contract summary of a list of numbers",
         "python function returns a list", "translate french", "dog"]


def reference_text_features(model_dir: Path, texts: list[str], pooling: str = "mean",
                            normalize: bool = True) -> np.ndarray:
    """Each text alone (no padding at all), plain mean over its tokens, in float64 after the model."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")
            out = model(**ids)
            h = out.last_hidden_state[0].double()  # (t, d)
            v = {"mean": h.mean(0), "cls": h[0], "pooler": out.pooler_output[0].double()}[pooling]
            rows.append((v / v.norm()) if normalize else v)
    return torch.stack(rows).numpy()


# --- text ----------------------------------------------------------------------------------------

def test_tiny_bert_detected_and_prototype_is_masked_mean(tiny_bert_dir: Path) -> None:
    assert detect_kind(tiny_bert_dir) == "text"
    enc = load_encoder(tiny_bert_dir)
    assert isinstance(enc, HFTextEncoder)
    assert not enc.model.training  # dropout 0.3 in the config: eval mode must be on
    p = compute_prototype(enc, TEXTS, batch_size=4)
    ref = reference_text_features(tiny_bert_dir, TEXTS).mean(0)
    np.testing.assert_allclose(p.vector, ref, atol=1e-6, rtol=0)
    assert p.n_samples == len(TEXTS)
    assert p.space.dim == 32 and p.space.pooling == "mean" and p.space.normalize
    assert p.space.encoder == "tiny-bert"
    assert p.space.revision == model_fingerprint(tiny_bert_dir)


def test_padding_does_not_change_features(tiny_bert_dir: Path) -> None:
    enc = HFTextEncoder(tiny_bert_dir)
    alone = enc.encode(["dog"])
    padded = enc.encode(["dog", "legal contract summary of a list of numbers the cat sat on the mat"])
    assert padded.shape == (2, 32) and padded.dtype == np.float32
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-6, rtol=0)
    assert np.abs(padded[0] - padded[1]).max() > 1e-3  # different texts, different features
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "pooler"])
def test_text_poolings_and_raw_features(tiny_bert_dir: Path, pooling: str) -> None:
    enc = HFTextEncoder(tiny_bert_dir, pooling=pooling, normalize=False)
    got = enc.encode(TEXTS[:3])
    ref = reference_text_features(tiny_bert_dir, TEXTS[:3], pooling=pooling, normalize=False)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert enc.space.pooling == pooling and not enc.space.normalize
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_text_encoder_rejects_bad_settings_and_inputs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="'pooling' parameter of HFTextEncoder must be one of"):
        HFTextEncoder(tiny_bert_dir, pooling="max")
    enc = HFTextEncoder(tiny_bert_dir)
    with pytest.raises(EncoderError, match="Item 1 of the batch is int"):
        enc.encode(["ok", 3])
    with pytest.raises(EncoderError, match="must be an existing directory"):
        HFTextEncoder(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EncoderError, match="could not load"):
        HFTextEncoder(tmp_path)


def test_space_dim_probe_and_max_length_clamped(tiny_bert_dir: Path) -> None:
    enc = HFTextEncoder(tiny_bert_dir, max_length=10_000)
    assert enc.max_length == 64  # max_position_embeddings of the tiny config
    assert enc.space.dim == 32  # learnt by a probe forward
    long = " ".join(["cat"] * 500)
    assert enc.encode([long]).shape == (1, 32)  # truncated, not an index error


def test_fingerprint_follows_weights_and_config(tiny_bert_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_dir, copy)
    fp = model_fingerprint(copy)
    assert fp == model_fingerprint(tiny_bert_dir)  # same bytes, other place
    w = copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # last byte: inside the "last MiB" window
    w.write_bytes(bytes(data))
    assert model_fingerprint(copy) != fp
    shutil.copy(tiny_bert_dir / "model.safetensors", w)
    assert model_fingerprint(copy) == fp
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert model_fingerprint(copy) != fp


# --- vision --------------------------------------------------------------------------------------

def _vit_reference(model_dir: Path, images: list, pooling: str) -> np.ndarray:
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        pv = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pv)
    h = out.last_hidden_state  # (n, tokens, d)
    v = {"pooler": out.pooler_output, "cls": h[:, 0], "mean": h.mean(1)}[pooling].double()
    return (v / v.norm(dim=1, keepdim=True)).numpy()


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_tiny_vit_on_an_image_folder(tiny_vit_dir: Path, image_folder: Path, pooling: str) -> None:
    from PIL import Image

    assert detect_kind(tiny_vit_dir) == "vision"
    enc = load_encoder(tiny_vit_dir, pooling=pooling)
    assert isinstance(enc, HFVisionEncoder)
    p = compute_prototype(enc, image_folder, batch_size=2)
    names = ["a.png", "b.PNG", "c.png", "d.bmp", "e.jpg"]  # sorted by name; notes.txt ignored
    images = [Image.open(image_folder / n) for n in names]
    ref = _vit_reference(tiny_vit_dir, images, pooling)
    np.testing.assert_allclose(p.vector, ref.mean(0), atol=1e-6, rtol=0)
    assert p.n_samples == 5 and p.space.pooling == pooling and p.space.dim == 32
    # the encoder also takes arrays and paths, in the same order
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    np.testing.assert_allclose(enc.encode(arrays), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode([image_folder / n for n in names]), ref, atol=1e-5, rtol=0)


def test_sam_vision_encoder_mean_pools_the_feature_map(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import SamImageProcessor, SamVisionConfig, SamVisionModel

    torch.manual_seed(2)
    cfg = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                          image_size=64, patch_size=16, mlp_dim=64, global_attn_indexes=[1], window_size=2)
    SamVisionModel(cfg).save_pretrained(tmp_path / "sam")
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(tmp_path / "sam")
    enc = load_encoder(tmp_path / "sam", pooling="mean", normalize=False)
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(3)]
    got = enc.encode(ims)
    assert got.shape == (3, 16)
    with torch.no_grad():
        pv = enc.processor(images=ims, return_tensors="pt")["pixel_values"]
        ref = enc.model(pixel_values=pv).last_hidden_state.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6, rtol=0)
    with pytest.raises(EncoderError, match="no pooler_output"):
        load_encoder(tmp_path / "sam").encode(ims)


# --- callables and load_encoder -------------------------------------------------------------------

def letter_counts(texts: list[str]) -> np.ndarray:
    """A module-level encoder for the 'module:function' spec test."""
    return np.array([[t.count("a"), t.count("e"), len(t)] for t in texts], dtype=np.float64)


def test_callable_encoder_space_normalisation_and_checks() -> None:
    enc = CallableEncoder(letter_counts, name="letters", revision="v1", normalize=True)
    with pytest.raises(EncoderError, match="pass dim="):
        _ = enc.space
    out = enc.encode(["banana", "tree"])
    raw = letter_counts(["banana", "tree"])
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-7)
    assert enc.space.key == "letters@v1|callable|l2|3"
    bad = CallableEncoder(lambda xs: np.ones((len(xs) + 1, 3)), name="bad")
    with pytest.raises(EncoderError, match=r"shape \(2, d\) for 2 inputs. Got shape \(3, 3\)"):
        bad.encode(["a", "b"])
    flip = iter([np.ones((1, 3)), np.ones((1, 4))])
    wobbly = CallableEncoder(lambda xs: next(flip), name="wobbly")
    wobbly.encode(["a"])
    with pytest.raises(ShapeMismatchError, match="dim 4, but earlier outputs had dim 3"):
        wobbly.encode(["a"])
    torch_enc = CallableEncoder(lambda xs: torch.ones(len(xs), 2, dtype=torch.float64), name="t", dim=2)
    assert torch_enc.encode(["x"]).dtype == np.float32


def test_load_encoder_specs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    enc = load_encoder(f"{__name__}:letter_counts")
    assert isinstance(enc, CallableEncoder) and enc.name == f"{__name__}:letter_counts"
    assert load_encoder(enc) is enc
    lam = load_encoder(lambda xs: [[1.0]] * len(xs), name="ones")
    assert isinstance(lam, CallableEncoder) and lam.name == "ones"
    st_like = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, st_like)
    (st_like / "modules.json").write_text("[]")
    assert detect_kind(st_like) == "sentence-transformers"
    assert detect_kind(tiny_bert_dir) == "text"
    assert isinstance(load_encoder(st_like, kind="text"), HFTextEncoder)
    with pytest.raises(EncoderError, match="cannot import module 'no_such_module_xyz'"):
        load_encoder("no_such_module_xyz:f")
    with pytest.raises(EncoderError, match="has no attribute 'nope'"):
        load_encoder("math:nope")
    with pytest.raises(EncoderError, match="no such directory; expected a model directory"):
        load_encoder(str(tmp_path / "nothing-here"))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(EncoderError, match="it is a file"):
        load_encoder(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="not a model directory we know"):
        load_encoder(tmp_path / "empty")
    with pytest.raises(UnknownNameError, match="'kind' parameter of load_encoder"):
        load_encoder(tiny_bert_dir, kind="audio")
    with pytest.raises(EncoderError, match=r"Cannot load an encoder from 3.5 \(float\)"):
        load_encoder(3.5)


def test_clip_image_tower(tmp_path: Path) -> None:
    """A two-tower CLIP dir with only an image processor: pooler = projected image features."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(3)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(tower, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
                     vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "clip")
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)) for i in range(3)]
    enc = load_encoder(tmp_path / "clip")
    got = enc.encode(ims)
    with torch.no_grad():
        pv = enc.processor(images=ims, return_tensors="pt")["pixel_values"]
        ref = model.get_image_features(pixel_values=pv)
        ref = getattr(ref, "pooler_output", ref)
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-6, rtol=0)
    assert load_encoder(tmp_path / "clip", pooling="cls").encode(ims).shape == (3, 32)  # vision tower tokens


def test_max_length_is_recorded_and_only_for_text_encoders(tiny_bert_dir: Path, tiny_vit_dir: Path) -> None:
    short, wide = load_encoder(tiny_bert_dir, max_length=8), load_encoder(tiny_bert_dir)
    assert (short.space.max_length, wide.space.max_length) == (8, 64)  # 64: the tiny model's positions
    assert short.space.key.endswith("|max8") and short.space != wide.space
    text = " ".join(["cat"] * 40)
    assert np.abs(short.encode([text]) - wide.encode([text])).max() > 1e-4
    for spec in (tiny_vit_dir, "math:fabs", len):
        with pytest.raises(EncoderError, match="applies to text encoders"):
            load_encoder(spec, max_length=128)
    assert load_encoder(tiny_vit_dir).space.max_length is None
    assert CallableEncoder(len, name="n", dim=1).space.max_length is None
    with pytest.raises(ParameterError, match="max_length"):
        load_encoder(tiny_bert_dir, max_length="long")
