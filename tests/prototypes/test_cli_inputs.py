"""The CLI (its real entry point, ``main``) on inputs that are not what they claim, and --max-length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapterbank.cli import main

LONG = " ".join(["Return the indices that would sort an array along the last axis, stable for ties."] * 40)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``cli(*args)``: run ``adapterbank ARGS`` through ``main`` and return (exit status, stdout, stderr)."""

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "argv", ["adapterbank", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return "".join(res.stderr.split())  # rich may wrap or fold a long line: compare without whitespace


def squash(s: str) -> str:
    return "".join(s.split())


def test_prototype_max_length_is_used_and_recorded(tmp_path: Path, cli) -> None:
    samples = tmp_path / "long.jsonl"
    samples.write_text(json.dumps({"text": LONG}) + "\n")
    res = cli("prototype", samples, "-o", tmp_path / "d.npy")
    assert res.returncode == 0, res.stderr
    res = cli("prototype", samples, "-o", tmp_path / "w.npy", "--max-length", "512")
    assert res.returncode == 0, res.stderr
    assert "|max512" in squash(res.stdout)
    side = {n: json.loads((tmp_path / f"{n}.npy.json").read_text())["space"] for n in ("d", "w")}
    assert (side["d"]["max_length"], side["w"]["max_length"]) == (256, 512)
    d, w = np.load(tmp_path / "d.npy"), np.load(tmp_path / "w.npy")
    assert np.abs(d - w).max() > 1e-3


def test_bad_inputs_are_one_line_errors(tmp_path: Path, cli) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert squash(f"{bad}, line 2: not valid UTF-8") in one_line_error(cli("prototype", bad, "-o", tmp_path / "x.npy"))
    assert "appliestotextencoders" in one_line_error(
        cli("prototype", bad, "-o", tmp_path / "x.npy", "--encoder", "math:fabs", "--max-length", "64"))
    assert cli("init", tmp_path / "bank").returncode == 0
    np.save(tmp_path / "p.npy", np.ones(3, dtype=np.float32))
    (tmp_path / "p.npy.json").write_text("[1, 2, 3]")
    msg = one_line_error(cli("search", tmp_path / "bank", "--prototype", tmp_path / "p.npy"))
    assert squash(f"{tmp_path / 'p.npy.json'}: a prototype sidecar must be a JSON object") in msg
    np.save(tmp_path / "c.npy", np.ones(3, dtype=np.complex64))
    (tmp_path / "c.npy.json").write_text(json.dumps({"space": {"encoder": "e", "revision": None, "pooling": "mean",
                                                               "normalize": True, "dim": 3}, "n_samples": 1}))
    msg = one_line_error(cli("search", tmp_path / "bank", "--prototype", tmp_path / "c.npy"))
    assert squash(f"{tmp_path / 'c.npy'}: a prototype must hold real numbers") in msg and "complex64" in msg
    res = cli("search", tmp_path / "bank", "--prototype", tmp_path / "c.npy", "--max-length", "512")
    assert res.returncode == 2 and "--max-length" in res.stderr and "Traceback" not in res.stderr


def test_max_length_without_an_encoder_to_set_is_refused(tmp_path: Path, cli) -> None:
    res = cli("add", tmp_path / "bank", tmp_path / "adapter", "--max-length", "512")
    assert res.returncode == 2 and "--max-length" in res.stderr and "Traceback" not in res.stderr


def test_search_uses_the_banks_max_length(tmp_path: Path, cli, tiny_llama, peft_adapter) -> None:
    """A bank built with --max-length 512: later commands without the flag read 512 tokens too (same space)."""
    tiny_peft_dir = peft_adapter(tiny_llama(0), tmp_path / "ad", seed=1)
    bank = tmp_path / "bank"
    assert cli("init", bank).returncode == 0
    res = cli("add", bank, tiny_peft_dir, "--id", "long", "--description", LONG, "--max-length", "512")
    assert res.returncode == 0, res.stderr
    res = cli("search", bank, "--description", LONG, "--json")
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)
    assert "|max512" in hits["space"] and [h["id"] for h in hits["hits"]] == ["long"]
    assert hits["hits"][0]["distance"] < 1e-6  # the same text in the same space
