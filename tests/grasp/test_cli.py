"""The typer app of ``adapterbank grasp`` (train CONFIG.yaml, sample CKPT), through CliRunner."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from adapterbank.errors import FormatError
from adapterbank.cli.grasp import app
from adapterbank.grasp.recipe import validate_config


@pytest.fixture
def setup(tm, tmp_path):
    base = tm.tiny_dit()
    base.save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 6 + [2] * 3 + [3] * 1)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((len(labels), 1, 8, 8)).astype(np.float32), labels=labels)
    cfg = {"model": {"class": "DiTTransformer2DModel", "path": "base", "null_class": 5},
           "data": {"npz": "data.npz"},
           "partitioner": {"type": "frequency_tiers", "thresholds": [10, 3]},
           "adapter": {"kind": "residual", "rank": 2},
           "train": {"objective": "flow_matching", "steps": 3, "batch_size": 8, "lr": 0.01, "log_every": 1},
           "output": "ckpt"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, cfg


def test_train_then_sample(setup) -> None:
    tmp, _ = setup
    r = CliRunner().invoke(app, ["train", str(tmp / "cfg.yaml"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "head" in r.output and (tmp / "ckpt" / "grasp_config.json").is_file()
    r = CliRunner().invoke(app, ["sample", str(tmp / "ckpt"), "--labels", "0,3,3", "--out", str(tmp / "s.npz"),
                                 "--steps", "2", "--cfg-scale", "2.0"])
    assert r.exit_code == 0, r.output
    z = np.load(tmp / "s.npz")
    assert z["x"].shape == (3, 1, 8, 8) and z["groups"].tolist() == [0, 2, 2]
    assert np.isfinite(z["x"]).all()


def test_bad_config_and_labels(setup, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal (or xdist's): error lines must still be one line
    tmp, cfg = setup
    bad = {**cfg, "train": {**cfg["train"], "stpes": 3}}
    (tmp / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = CliRunner().invoke(app, ["train", str(tmp / "bad.yaml")])
    assert r.exit_code == 2 and "unknown key(s) ['stpes'] in section 'train'" in r.output
    with pytest.raises(FormatError, match="missing sections \\['output'\\]"):
        validate_config({k: v for k, v in cfg.items() if k != "output"})
    r = CliRunner().invoke(app, ["train", str(tmp / "cfg.yaml"), "--no-progress"])
    assert r.exit_code == 0
    r = CliRunner().invoke(app, ["sample", str(tmp / "ckpt"), "--labels", "0,9"])
    assert r.exit_code == 2 and "unknown label" in r.output
    r = CliRunner().invoke(app, ["sample", str(tmp / "nope"), "--labels", "0"])
    assert r.exit_code == 2 and "not a folder" in r.output


def test_kmeans_partitioner_from_config(setup, monkeypatch) -> None:
    """k-means on class-name embeddings from YAML: names → template → encoder (module:function) → groups."""
    tmp, cfg = setup
    (tmp / "ab_toy_names_enc.py").write_text(
        "def encode(texts):\n"
        "    # 2-d: is it footwear? how long is the name?\n"
        "    return [[10.0 * any(w in t for w in ('boot', 'sneaker')), 0.01 * len(t)] for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp))
    part = {"type": "kmeans", "n_groups": 2, "encoder": "ab_toy_names_enc:encode", "seed": 0,
            "label_names": ["ankle boot", "sneaker", "shirt", "coat"], "template": "a photo of a {label}"}
    (tmp / "km.yaml").write_text(yaml.safe_dump({**cfg, "partitioner": part}))
    r = CliRunner().invoke(app, ["train", str(tmp / "km.yaml"), "--no-progress"])
    assert r.exit_code == 0, r.output
    from adapterbank.grasp import read_checkpoint

    conf, _ = read_checkpoint(tmp / "ckpt")
    lg = conf["partitioner"]["label_group"]
    assert lg["0"] == lg["1"] != lg["2"] == lg["3"]  # footwear vs tops
    bad = {**part, "label_names": ["only one"]}
    (tmp / "bad.yaml").write_text(yaml.safe_dump({**cfg, "partitioner": bad}))
    r = CliRunner().invoke(app, ["train", str(tmp / "bad.yaml"), "--no-progress"])
    assert r.exit_code == 2 and "label_names" in r.output
