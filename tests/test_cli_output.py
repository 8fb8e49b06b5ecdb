"""What the ``adapterbank`` command prints, run as users run it: a real subprocess of the console entry point.

Lazy imports (``--help`` without torch, ``compose --prototype`` without transformers), full digits when
stdout is a pipe, ``--json``, the note when ``-k`` exceeds the pool, hub ids where a path is expected,
one-line errors, the prototype progress bar (through a real pseudo-terminal).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adapterbank
from adapterbank.errors import PoolSmallerThanKWarning

SRC = str(Path(adapterbank.__file__).resolve().parents[1])
SPACE = ("toy-encoder", "r1", "mean", False, 2)
# Long ids make rich's 80-column layout cut the distance column ("36.39…") when stdout is a pipe.
IDS = [f"{name}-adapter-with-a-name-long-enough-to-squeeze-the-table-{i}"
       for i, name in enumerate(["mathematics", "filesystem", "networking"])]
VECTORS = [[6.0324517, 0.1], [1.23456789, 2.3456789], [-3.14159265, 2.71828183]]
TARGET = [0.0123456, 0.0]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "80", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), SRC, os.environ.get("PYTHONPATH")) if p)
    return env


def cli(*args: Any, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``adapterbank ARGS`` in a fresh interpreter, stdout and stderr piped (not terminals)."""
    return subprocess.run([sys.executable, "-m", "adapterbank.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env(**env), timeout=600)


def _modules_after(args: list[str]) -> tuple[int, list[str], str]:
    """Run the CLI's ``main`` on ``args`` in a fresh interpreter; return its exit code, the heavy modules it
    imported, and its stdout."""
    code = (
        "import sys, json\n"
        "from adapterbank.cli import main\n"
        f"sys.argv = ['adapterbank', *{args!r}]\n"
        "try:\n    main()\n    code = 0\n"
        "except SystemExit as e:\n    code = e.code or 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'peft', 'diffusers')\n"
        "         if m in sys.modules]\n"
        "sys.stderr.write('\\nMODULES ' + json.dumps([code, heavy]) + '\\n')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    line = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")]
    assert line, r.stderr
    rc, heavy = json.loads(line[-1][len("MODULES "):])
    return rc, heavy, r.stdout


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-adapter bank with hand-made prototypes in a toy space (no encoder), and a target prototype."""
    from adapterbank.bank import Bank
    from adapterbank.lora import LoraAdapter, LoraModule
    from adapterbank.prototypes.space import Prototype, PrototypeSpace

    root = tmp_path_factory.mktemp("cli-output")
    b = Bank.init(root / "bank")
    space = PrototypeSpace(*SPACE)
    g = torch.Generator().manual_seed(0)
    for id_, v in zip(IDS, VECTORS, strict=True):
        ad = LoraAdapter({"fc": LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 0.5,
                                           (4, 3))})
        b.add(ad, id=id_, base_model="toy-base", prototype=Prototype(np.array(v), space))
    Prototype(np.array(TARGET), space, 1, "target").save(root / "target.npy")
    return root


def _distances() -> dict[str, float]:
    t = np.array(TARGET, dtype=np.float32)
    return {i: float(((np.array(v, dtype=np.float32) - t) ** 2).sum()) for i, v in zip(IDS, VECTORS, strict=True)}


# --- imports ---------------------------------------------------------------------------------------

def test_help_does_not_import_torch() -> None:
    rc, heavy, out = _modules_after(["--help"])
    assert rc == 0 and "compose" in out and "grasp" in out
    assert heavy == []
    rc, heavy, out = _modules_after(["compose", "--help"])
    assert rc == 0 and "--prototype" in out and heavy == []


def test_search_with_a_prototype_imports_no_torch(bank: Path) -> None:
    """A cold ``search --prototype`` (the library-scale path: persisted index, no tensors) stays numpy-only."""
    rc, heavy, out = _modules_after(["search", str(bank / "bank"), "--prototype", str(bank / "target.npy"), "-k", "2"])
    assert rc == 0, out
    assert min(_distances(), key=_distances().get) in out
    assert heavy == []


def test_grasp_group_still_lists_its_commands() -> None:
    r = cli("grasp", "--help")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "sample" in r.stdout


def test_compose_with_prototype_loads_no_encoder_or_model_library(bank: Path) -> None:
    rc, heavy, out = _modules_after(["compose", str(bank / "bank"), "--prototype", str(bank / "target.npy"),
                                     "-k", "2", "-o", str(bank / "lean")])
    assert rc == 0, out
    assert (bank / "lean" / "composition.json").is_file()
    assert "torch" in heavy  # the exact merge works on torch tensors
    assert not {"transformers", "sentence_transformers", "peft", "diffusers"} & set(heavy), heavy
    recipe = json.loads((bank / "lean" / "composition.json").read_text())
    import peft

    assert recipe["versions"]["peft"] == peft.__version__


# --- piped output, --json -------------------------------------------------------------------------

def test_piped_tables_keep_every_digit(bank: Path) -> None:
    r = cli("search", bank / "bank", "--prototype", bank / "target.npy", "-k", "3")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    for id_, d in _distances().items():
        assert id_ in r.stdout and f"{d:.6g}" in r.stdout, (id_, d, r.stdout)
    r = cli("compose", bank / "bank", "--prototype", bank / "target.npy", "-k", "3", "-o", bank / "piped")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    weights = json.loads((bank / "piped" / "composition.json").read_text())["weights"]
    for id_, w in weights.items():
        assert id_ in r.stdout and f"{w:+.4f}" in r.stdout
    assert str(bank / "piped") in r.stdout  # the path is on one line, not wrapped
    r = cli("list", bank / "bank")
    assert r.returncode == 0 and "…" not in r.stdout
    assert "toy-encoder@r1|mean|raw|2" in r.stdout


def test_json_outputs_parse(bank: Path) -> None:
    r = cli("search", bank / "bank", "--prototype", bank / "target.npy", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    dist = _distances()
    assert [h["id"] for h in doc["hits"]] == sorted(dist, key=dist.get)[:2] and doc["k"] == 2
    assert all(abs(h["distance"] - dist[h["id"]]) < 1e-4 for h in doc["hits"])

    r = cli("compose", bank / "bank", "--prototype", bank / "target.npy", "-k", "3", "-o", bank / "js", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["out"] == str(bank / "js") and doc["format"] == "peft"
    assert abs(sum(doc["weights"].values()) - 1) < 1e-9
    assert doc["weights"] == json.loads((bank / "js" / "composition.json").read_text())["weights"]

    r = cli("list", bank / "bank", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(c["id"] for c in json.loads(r.stdout)) == sorted(IDS)
    r = cli("show", bank / "bank", IDS[0], "--json")
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    assert card["id"] == IDS[0] and card["base_model"] == "toy-base"


def test_evaluate_json(bank: Path, tmp_path: Path) -> None:
    ev = tmp_path / "count_eval.py"
    ev.write_text("def score(adapter, card):\n"
                  "    ranks = [] if adapter is None else [m.rank for m in adapter.modules.values()]\n"
                  "    return {'n': float(sum(ranks))}\n")
    r = cli("evaluate", bank / "bank", "--evaluator", f"{ev}:score", "-k", "2", "--strategies", "avg",
            "-o", tmp_path / "report", "--no-plots", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["report"] == str(tmp_path / "report" / "index.html")
    assert set(doc["scores"]["n"]) == set(IDS)
    assert all(row["pretrained"] == 0.0 and row["avg"] == 4.0 for row in doc["scores"]["n"].values())


# --- notes and messages ---------------------------------------------------------------------------

def test_k_larger_than_the_pool_says_so(bank: Path) -> None:
    r = cli("search", bank / "bank", "--prototype", bank / "target.npy", "-k", "50", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["hits"]) == 3  # stdout is still only the JSON
    assert "note: k=50 but only 3 adapter(s)" in r.stderr and "used 3" in r.stderr
    r = cli("compose", bank / "bank", "--prototype", bank / "target.npy", "-k", "50", "-o", bank / "k50")
    assert r.returncode == 0, r.stderr
    assert "note: k=50 but only 3 adapter(s)" in r.stderr
    r = cli("search", bank / "bank", "--prototype", bank / "target.npy", "-k", "3")
    assert "note:" not in r.stderr


def test_k_larger_than_the_pool_warns_in_python(bank: Path) -> None:
    from adapterbank.bank import Bank
    from adapterbank.compose import compose
    from adapterbank.prototypes.space import Prototype

    b = Bank.open(bank / "bank")
    target = Prototype.load(bank / "target.npy")
    with pytest.warns(PoolSmallerThanKWarning, match="k=5 but only 3"):
        assert len(b.search(target, k=5)) == 3
    with pytest.warns(PoolSmallerThanKWarning, match="k=4 but only 2"):
        assert len(compose(b, target, k=4, exclude=[IDS[0]]).ids) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(b.search(target, k=3)) == 3


@pytest.mark.parametrize("args, flag", [
    (["add", "BANK", "meta-llama/Llama-3.1-8B"], "SOURCE"),
    (["search", "BANK", "--description", "a task", "--encoder", "sentence-transformers/all-MiniLM-L6-v2"],
     "--encoder"),
    (["compose", "BANK", "--prototype", "TARGET", "-o", "out", "--merge-into", "meta-llama/Llama-3.1-8B"],
     "--merge-into"),
])
def test_hub_id_says_how_to_download(bank: Path, tmp_path: Path, args: list[str], flag: str) -> None:
    args = [str(bank / "bank") if a == "BANK" else str(bank / "target.npy") if a == "TARGET" else a for a in args]
    hub_id = next(a for a in args if "/" in a and not a.startswith("/"))
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and flag in line
    assert f"hf download {hub_id} --local-dir DIR" in line and "then pass DIR" in line
    assert not (tmp_path / "out").exists()


def test_error_lines_are_never_wrapped(tmp_path: Path) -> None:
    missing = tmp_path / "a-bank-folder-whose-name-is-much-longer-than-a-forty-column-terminal"
    r = cli("list", missing, COLUMNS="40")
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], r.stderr


# --- the prototype progress bar, on a real terminal ------------------------------------------------

def test_count_hint_gives_the_bar_its_total(tmp_path: Path) -> None:
    from adapterbank.prototypes.inputs import count_hint, iter_items

    f = tmp_path / "a.jsonl"
    long_line = b'{"text": "' + b"c" * (3 << 20) + b'"}'  # spans blocks; no final newline
    f.write_bytes(b'{"text": "a"}\n\n   \n{"text": "b"}\n' + long_line)
    assert count_hint(f) == 3  # a line longer than the 1 MiB blocks counts once
    f.write_text('{"text": "a"}\n\n   \n{"text": "b"}')
    assert count_hint(f) == len(list(iter_items(f))) == 2
    c = tmp_path / "a.csv"
    c.write_text("text,label\nx,1\ny,2\n")
    assert count_hint(c) == 2
    (tmp_path / "imgs").mkdir()
    for n in ("a.png", "b.jpg", "notes.md"):
        (tmp_path / "imgs" / n).write_bytes(b"")
    assert count_hint(tmp_path / "imgs") == 2
    assert count_hint(tmp_path / "missing.jsonl") is None and count_hint(iter(["x"])) is None


def test_add_progress_bar_has_total_and_stays(bank: Path, tmp_path: Path) -> None:
    """stderr is a pseudo-terminal, as in a shell: the bar shows n/total and an ETA, and is still there at the end."""
    from adapterbank.bank import Bank

    (tmp_path / "toy_len_encoder.py").write_text("def encode(texts):\n"
                                                 "    return [[float(len(t)), 1.0] for t in texts]\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"text": "x" * (i + 1)}) + "\n" for i in range(7)) + "\n")  # + a blank line
    source = Bank.open(bank / "bank").export(IDS[0], tmp_path / "src")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120-column terminal
    try:
        proc = subprocess.run([sys.executable, "-m", "adapterbank.cli", "add", str(bank / "bank"), str(source),
                               "--id", "with-bar", "--samples", str(samples), "--encoder", "toy_len_encoder:encode",
                               "--batch-size", "2"],
                              stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True,
                              env=_env(PYTHONPATH=str(tmp_path)), timeout=600)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    assert "7/7" in err and "<" in err.split("7/7")[-1]  # n/total, then [elapsed<remaining]
    last = err.rstrip("\r\n").split("\r")[-1]
    assert "prototype" in last and "100%" in last and "7/7" in last  # left in place, not cleared


def test_compose_with_target_loads_the_encoder_once_and_quietly(tmp_path: Path) -> None:
    """--target: one encoder load (the real all-MiniLM-L6-v2), and no "Loading weights" bar on stderr."""
    from adapterbank.bank import Bank
    from adapterbank.lora import LoraAdapter, LoraModule
    from adapterbank.prototypes import describe, load_encoder

    enc = load_encoder("default")
    b = Bank.init(tmp_path / "bank")
    g = torch.Generator().manual_seed(1)
    for id_, text in (("sqrt", "compute the square root of a number"), ("rm", "delete a file from disk"),
                      ("socket", "open a network socket")):
        ad = LoraAdapter({"fc": LoraModule(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 1.0,
                                           (4, 3))})
        b.add(ad, id=id_, base_model="toy-base", prototype=describe(enc, text))
    samples = tmp_path / "t.jsonl"
    samples.write_text(json.dumps({"text": "return the logarithm of x"}) + "\n")
    r = cli("compose", tmp_path / "bank", "--target", samples, "-k", "2", "--encoder", "default",
            "-o", tmp_path / "out", ADAPTERBANK_LOG="INFO")
    assert r.returncode == 0, r.stderr
    loads = [x for x in r.stderr.splitlines() if "SentenceTransformerEncoder" in x and "pooling=" in x]
    assert len(loads) == 1, r.stderr
    assert "Loading weights" not in r.stderr


def test_formats_command_lists_the_formats_table() -> None:
    """`adapterbank formats` is where --format's help points: it lists exactly the table, in its order."""
    from adapterbank.formats import FORMATS

    r = cli("formats", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == list(FORMATS)
    assert {x["name"]: x["composites_as"] for x in rows}["kohya"] == "diffusers"
    r = cli("formats")
    assert r.returncode == 0 and all(name in r.stdout for name in FORMATS)
