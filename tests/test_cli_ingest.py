"""``adapterbank add BANK SOURCE... [--manifest]``: folders, globs, manifests, the summary, exit codes, --json,
one encoder per run; and the single-adapter form as it always was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapterbank.bank import Bank
from adapterbank.bank.persisted import space_dir_name
from adapterbank.cli import app

runner = CliRunner()
STEM = "lora_unet_down_blocks_0_attentions_0_proj_in"
ENCODER_MODULE = '''
CALLS = []

def encode(texts):
    CALLS.append(len(texts))
    return [[float(len(t)), float(len(t.split()))] for t in texts]
'''


def kohya(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{STEM}.lora_down.weight": torch.randn(2, 8, generator=g).half(),
               f"{STEM}.lora_up.weight": torch.randn(8, 2, generator=g).half(),
               f"{STEM}.alpha": torch.tensor(2.0).half()}, str(path))
    return path


def run(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any, peft_adapter: Any) -> Path:
    """A library folder: kohya files at two depths, a PEFT folder, a broken .safetensors and a text file."""
    root = tmp_path_factory.mktemp("lib")
    for i in range(3):
        kohya(root / f"style-{i}.safetensors", i)
    kohya(root / "more" / "deep.safetensors", 10)
    peft_adapter(tiny_llama(), root / "more" / "peft-task", seed=1)
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (root / "README.txt").write_text("not an adapter")
    return root


@pytest.fixture(autouse=True)
def _bank(tmp_path: Path) -> None:
    Bank.init(tmp_path / "bank").close()


def test_folder_and_glob_summary_refusals_exit_codes(tmp_path: Path, lib: Path) -> None:
    bank = tmp_path / "bank"
    res = run("add", bank, lib, "--workers", "2", "--batch-size", "2", "--tags", "lib")
    assert res.exit_code == 1, res.output  # broken.safetensors was refused
    assert "added 5, already present 0, refused 1" in res.stdout and "adapters/s" in res.stdout
    assert "refused" in res.stderr and str(lib / "broken.safetensors") in res.stderr
    with Bank.open(bank) as b:
        assert sorted(c.id for c in b.list()) == ["deep", "peft-task", "style-0", "style-1", "style-2"]
        assert all(c.tags == ["lib"] for c in b.list()) and b.verify().ok
    res = run("add", bank, str(lib / "style-*.safetensors"), lib / "more")  # a quoted glob is expanded here
    assert res.exit_code == 0, res.output
    assert "added 0, already present 5, refused 0" in res.stdout
    res = run("add", bank, lib / "style-0.safetensors", lib / "nowhere.safetensors", "--json")
    assert res.exit_code == 1
    rep = json.loads(res.stdout)
    assert rep["present"] == ["style-0"] and rep["refused"][0]["error"] == "FileNotFoundError"
    assert "nowhere.safetensors" in rep["refused"][0]["reason"] and rep["ok"] is False
    (tmp_path / "empty").mkdir()
    res = run("add", bank, tmp_path / "empty", lib / "style-1.safetensors")
    assert res.exit_code == 1 and "no adapters in it" in res.stderr


def test_manifest_descriptions_one_encoder_for_the_run(tmp_path: Path, lib: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "encmod_ingest.py").write_text(ENCODER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import encmod_ingest  # the module the CLI's --encoder imports

    (tmp_path / "lib").symlink_to(lib)
    man = tmp_path / "manifest.jsonl"
    rows = [{"source": "lib/style-0.safetensors", "id": "watercolour", "description": "watercolour cats",
             "tags": ["paint"], "license": "mit"},
            {"source": "lib/style-1.safetensors", "description": "pixel art", "tags": "retro,8bit", "base": "sd15"},
            {"source": "lib/more/deep.safetensors", "description": "film noir portraits", "source_url": "https://x/y"},
            {"source": "lib/style-2.safetensors"}]
    man.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    res = run("add", tmp_path / "bank", "--manifest", man, "--encoder", "encmod_ingest:encode", "--batch-size", "2",
              "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["added"] == ["watercolour", "style-1", "deep", "style-2"] and rep["encoded"] == 3
    assert encmod_ingest.CALLS == [2, 1]  # one call per batch: [watercolour, style-1], [deep] (style-2 has none)
    with Bank.open(tmp_path / "bank") as b:
        c = b.get("watercolour")
        assert (c.description, c.tags, c.license) == ("watercolour cats", ["paint"], "mit")
        assert b.get("style-1").tags == ["retro", "8bit"] and b.get("style-1").base_model == "sd15"
        assert b.get("deep").source == "https://x/y" and b.get("style-2").prototype_spaces == []
        proto = b.get_prototype("deep")
        assert proto.vector.tolist() == [19.0, 3.0] and proto.extra["description"] == "film noir portraits"
        assert b.encoders() == {proto.space.key: "encmod_ingest:encode"}
        # the run left the persisted search index up to date: the next process opens it, builds nothing
        meta = json.loads((tmp_path / "bank" / "index" / space_dir_name(proto.space.key) / "meta.json").read_text())
        assert meta["catalog_version"] == b.version and meta["n"] == 3


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "line 2: not valid JSON"),
    ('["a"]', "line 2: a row must be a JSON object"),
    ('{"id": "x"}', "line 2: the row has no 'source'"),
    ('{"source": "a", "descripton": "typo"}', "line 2: unknown key 'descripton'"),
    ('{"source": "a", "tags": [1]}', "line 2: key 'tags' must be a list of strings"),
    ('{"source": 3}', "line 2: key 'source' must be a non-empty string"),
])
def test_a_malformed_manifest_row_names_its_line(tmp_path: Path, line: str, message: str) -> None:
    man = tmp_path / "m.jsonl"
    man.write_text('{"source": "style-0.safetensors"}\n' + line + "\n")
    res = run("add", tmp_path / "bank", "--manifest", man)
    assert res.exit_code != 0 and isinstance(res.exception, Exception)
    assert message in str(res.exception) and str(man) in str(res.exception)
    with Bank.open(tmp_path / "bank") as b:
        assert len(b) == 0  # the manifest is read whole before anything is added


def test_the_single_adapter_form_is_unchanged(tmp_path: Path, lib: Path) -> None:
    bank = tmp_path / "bank"
    res = run("add", bank, lib / "style-0.safetensors", "--id", "one", "--tags", "a,b", "--license", "mit")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Added one (kohya, base None, rank 2, 1 modules), no prototype")
    single = tmp_path / "single"
    shutil.copytree(lib / "more", single, ignore=shutil.ignore_patterns("peft-task"))
    res = run("add", bank, single, "--json")  # a folder holding one kohya file is one adapter, as before
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["added"] == ["single"]
    res = run("add", bank, lib / "style-0.safetensors", "--id", "one")
    assert res.exit_code != 0 and "already has an adapter with id 'one'" in str(res.exception)
    res = run("add", bank, lib / "style-1.safetensors", lib / "style-2.safetensors", "--id", "x")
    assert res.exit_code == 2 and "--id describes one adapter" in res.output
    res = run("add", bank)
    assert res.exit_code == 2 and "--manifest" in res.output


def test_the_progress_bar_counts_to_the_total() -> None:
    import io
    import time

    from rich.console import Console

    from adapterbank.cli.main import _ingest_progress

    with _ingest_progress(5, enabled=False) as advance:
        assert advance is None
    out = io.StringIO()
    with _ingest_progress(5, enabled=True, console=Console(file=out, force_terminal=True, width=100)) as advance:
        advance(2)
        time.sleep(0.05)
        advance(3)
    text = out.getvalue()
    assert "5/5" in text and "adapters/s" in text
