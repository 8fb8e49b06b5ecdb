"""The command line, end to end, with the real all-MiniLM-L6-v2 encoder and real PEFT adapters."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from adapterbank.cli import app

runner = CliRunner()

TEXTS = {
    "math": ["Return the square root of x.", "Return the cosine of x in radians.", "Return the factorial of n."],
    "files": ["Remove a file from disk.", "Rename the file or directory src to dst.", "Return the size of a file."],
    "web": ["Send an HTTP GET request.", "Parse a URL into components.", "Open a socket to the server."],
}


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def run(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    return res


@pytest.fixture(scope="module")
def cli_bank(tmp_path_factory, tiny_llama, peft_adapter):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama()
    assert run("init", root / "bank").exit_code == 0
    for i, (name, texts) in enumerate(TEXTS.items()):
        ad = peft_adapter(base, root / name, seed=i, r=2 + i)
        res = run("add", root / "bank", ad, "--samples", _jsonl(root / f"{name}.jsonl", texts),
                  "--encoder", "default", "--tags", "demo")
        assert res.exit_code == 0, res.output
    ad = peft_adapter(base, root / "style", seed=9)
    res = run("add", root / "bank", ad, "--description", "statistics: mean, median and variance of data")
    assert res.exit_code == 0, res.output
    return root


def test_list_show_verify(cli_bank):
    res = run("list", cli_bank / "bank")
    assert res.exit_code == 0 and all(n in res.output for n in ["math", "files", "web", "style"])
    res = run("show", cli_bank / "bank", "math")
    assert res.exit_code == 0 and json.loads(res.output)["id"] == "math"
    res = run("verify", cli_bank / "bank")
    assert res.exit_code == 0 and "ok" in res.output


def test_prototype_search_compose(cli_bank, tiny_llama):
    from peft import PeftModel

    tgt = _jsonl(cli_bank / "target.jsonl", ["Return the natural logarithm of x.", "Return x raised to the power y."])
    res = run("prototype", cli_bank / "bank", tgt, "-o", cli_bank / "target.npy")
    assert res.exit_code == 0, res.output
    assert (cli_bank / "target.npy.json").exists()
    res = run("search", cli_bank / "bank", "--prototype", cli_bank / "target.npy", "-k", "2")
    assert res.exit_code == 0 and res.output.index("math") < res.output.index("top-2") + 400
    out = cli_bank / "composite"
    res = run("compose", cli_bank / "bank", "--target", tgt, "-k", "3", "--strategy", "sparse", "-o", out)
    assert res.exit_code == 0, res.output
    assert "sparse weights" in res.output and "lam" in res.output
    recipe = json.loads((out / "composition.json").read_text())
    assert abs(sum(recipe["weights"].values()) - 1) < 1e-9
    model = PeftModel.from_pretrained(tiny_llama(), out)
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 128)


def test_export_round_trip_bit_for_bit(cli_bank):
    out = cli_bank / "exported"
    res = run("export", cli_bank / "bank", "math", "-o", out)
    assert res.exit_code == 0, res.output
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (cli_bank / "math" / name).read_bytes()


def test_errors_are_clear(cli_bank):
    res = run("compose", cli_bank / "bank", "--description", "x", "--strategy", "magic", "-o", cli_bank / "bad")
    assert res.exit_code != 0
    assert "magic" in str(res.exception) or "magic" in res.output
    res = run("add", cli_bank / "bank", cli_bank / "math", "--id", "../escape")
    assert res.exit_code != 0
    res = run("list", cli_bank / "nonexistent")
    assert res.exit_code != 0


# --- adapterbank demo (shipped trained all-MiniLM-L6-v2 LoRAs, see src/adapterbank/demo_data/) -------------

def test_demo_quick(tmp_path):
    """The README's first command, in its smoke-test size: one held-out domain, every strategy, the report."""
    res = run("demo", "-o", tmp_path / "demo", "--quick")
    assert res.exit_code == 0, res.output
    for text in ("mrr@10", "recall@1", "Pre-trained", "SFT", "Sparse", "matched the dense", "yes"):
        assert text in res.output, text
    report = tmp_path / "demo" / "report"
    assert (report / "index.html").exists() and (report / "results.md").exists()
    doc = json.loads((report / "results.json").read_text())
    methods = {r["method"] for r in doc["records"]}
    assert {"pretrained", "sft", "avg", "sim", "lin", "sparse", "nearest"} <= methods
    for r in doc["records"]:
        assert 0.0 <= r["metrics"]["mrr@10"] <= 1.0
        if r["method"] not in ("pretrained", "sft"):
            assert r["target"] not in r["ids"] and abs(sum(r["weights"]) - 1) < 1e-6  # leave-one-out, Σw = 1
    recipe = json.loads((tmp_path / "demo" / "composites" / "stdlib" / "sparse" / "composition.json").read_text())
    assert "stdlib" not in recipe["weights"]


def test_demo_scorer_cached_layers_are_exact():
    """The demo's scorer reuses the base's layer-3 inputs; with a shipped adapter merged, it equals a full forward."""
    from adapterbank.demo import MiniLMRetrieval, load_demo_data
    from adapterbank.formats import read_adapter

    data = load_demo_data()
    cfg = data.manifest["config"]
    scorer = MiniLMRetrieval(q_len=cfg["q_len"], d_len=cfg["d_len"], split=cfg["split"])
    texts = data.test["numpy"]["docs"][:6] + ["a short text", "x"]
    scorer.load(read_adapter(data.adapters["numpy"]))
    with torch.inference_mode():
        cached = scorer.upper(scorer.lower(texts, scorer.d_len))
        full = scorer.embed(texts, scorer.d_len)
    assert torch.allclose(cached, full, atol=1e-5)
    base = scorer(None, data.test["numpy"])
    assert scorer(None, data.test["numpy"]) == base  # memoised, deterministic
