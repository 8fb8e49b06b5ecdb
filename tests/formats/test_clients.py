"""Composites and exports as their real clients load them: diffusers pipelines, AutoPeftModel, vLLM's config
checks (reimplemented from its source), and the kohya text-encoder warning."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.compose import RECIPE_FILE, compose
from adapterbank.compose.compose import default_output_format
from adapterbank.errors import FormatError, ParameterError
from adapterbank.formats import read_adapter, write_adapter
from adapterbank.formats.kohya import KohyaTextEncoderWarning
from adapterbank.lora import LoraAdapter
from adapterbank.prototypes import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
UNET = ["conv_in", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
TE = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[2] / "src"),
                                                                     os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "adapterbank.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def proto(tmp: Path, seed: int) -> Path:
    return Prototype(np.random.default_rng(seed).normal(size=8), SPACE, n_samples=3, source=f"t{seed}").save(
        tmp / f"p{seed}.npy")


# --------------------------------------------------------------------------- item 2: SD composites for diffusers


@pytest.fixture(scope="module")
def sd_bank(tmp_path_factory: pytest.TempPathFactory, tiny_unet: Any, tiny_clip: Any,
            rand_adapter: Callable[..., LoraAdapter]) -> tuple[Bank, dict[str, LoraAdapter], Path]:
    """A bank with one kohya and one diffusers Stable Diffusion adapter (UNet + text encoder)."""
    root = tmp_path_factory.mktemp("sd")
    bank = Bank.init(root / "bank")
    adapters: dict[str, LoraAdapter] = {}
    for i, fmt in enumerate(("kohya", "diffusers")):
        u = rand_adapter(tiny_unet, UNET, seed=20 + i, prefix="unet.")
        t = rand_adapter(tiny_clip, TE, seed=30 + i, prefix="text_encoder.text_model.")
        a = LoraAdapter({**u.modules, **t.modules}, "tiny-sd", {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KohyaTextEncoderWarning)
            (f,) = write_adapter(a, root / fmt, format=fmt)
        rng = np.random.default_rng(i)
        bank.add(f, id=fmt, prototype=Prototype(rng.normal(size=8), SPACE, n_samples=3, source=fmt))
        adapters[fmt] = a
    return bank, adapters, root


def dense_sum(adapters: dict[str, LoraAdapter], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ w_i ΔW_i per module path, in float64."""
    acc: dict[str, torch.Tensor] = {}
    for i, w in weights.items():
        for k, m in adapters[i].modules.items():
            acc[k] = acc.get(k, 0) + w * m.delta(torch.float64)
    return acc


def patched(model: Any, deltas: dict[str, torch.Tensor], prefix: str) -> Any:
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    for k, d in deltas.items():
        if k.startswith(prefix):
            w = f"{k[len(prefix):]}.weight"
            sd[w] = (sd[w].double() + d).float()
    ref.load_state_dict(sd)
    return ref


def check_pipe(pipe: Any, tiny_unet: Any, tiny_clip: Any, deltas: dict[str, torch.Tensor]) -> None:
    """UNet and text-encoder outputs of the LoRA-loaded pipeline equal the base plus the dense Σ w_i ΔW_i."""
    ref_unet = patched(tiny_unet, deltas, "unet.")
    ref_te = patched(tiny_clip, deltas, "text_encoder.text_model.")  # transformers >= 5: flattened CLIP
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    with torch.no_grad():
        got, ref, plain = pipe.unet(x, t, c).sample, ref_unet(x, t, c).sample, tiny_unet(x, t, c).sample
        got_te, ref_te_out = pipe.text_encoder(ids).last_hidden_state, ref_te(ids).last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_te, ref_te_out, atol=1e-5, rtol=0)
    assert (ref - plain).abs().max() > 1e-3  # the composite does something


def test_sd_composite_defaults_to_diffusers_and_loads(sd_bank: Any, tmp_path: Path, sd_pipe_factory: Any,
                                                      tiny_unet: Any, tiny_clip: Any) -> None:
    bank, adapters, _ = sd_bank
    comp = compose(bank, Prototype(np.zeros(8), SPACE), strategy="lin", ids=["kohya", "diffusers"])
    assert sorted(comp.source_formats) == ["diffusers", "kohya"]
    out = comp.save(tmp_path / "c")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / RECIPE_FILE).read_text())["output"]["format"] == "diffusers"
    pipe = sd_pipe_factory()
    pipe.load_lora_weights(str(out), adapter_name="composite")
    check_pipe(pipe, tiny_unet, tiny_clip, dense_sum(adapters, dict(zip(comp.ids, comp.weights.tolist()))))
    with pytest.raises(FormatError, match="load_lora_weights ignores a PEFT folder"):
        comp.save(tmp_path / "p", format="peft")


def test_sd_composite_cli_default_and_refused_peft(sd_bank: Any, tmp_path: Path, sd_pipe_factory: Any,
                                                   tiny_unet: Any, tiny_clip: Any) -> None:
    bank, adapters, _ = sd_bank
    p = proto(tmp_path, 5)
    res = cli("compose", bank.root, "--prototype", p, "--ids", "kohya,diffusers", "--strategy", "avg",
              "-o", tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "Wrote diffusers composite" in res.stdout
    pipe = sd_pipe_factory()
    pipe.load_lora_weights(str(tmp_path / "c"), adapter_name="composite")
    check_pipe(pipe, tiny_unet, tiny_clip, dense_sum(adapters, {"kohya": 0.5, "diffusers": 0.5}))
    res = cli("compose", bank.root, "--prototype", p, "--ids", "kohya,diffusers", "--format", "peft",
              "-o", tmp_path / "bad")
    assert res.returncode == 2 and res.stderr.startswith("error:") and "--format diffusers" in res.stderr
    assert "Traceback" not in res.stderr


def test_default_output_format_rules() -> None:
    assert default_output_format([]) == "peft"
    assert default_output_format(["peft", "peft"]) == "peft"
    assert default_output_format(["grasp_residual"]) == "grasp_residual"
    assert default_output_format(["kohya"], "kohya") == "kohya"
    with pytest.raises(FormatError, match="pass --format"):
        default_output_format(["peft", "kohya"])


# --------------------------------------------------------------------------- item 6: kohya text-encoder warning


def test_kohya_text_encoder_export_warns(sd_bank: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bank, adapters, _ = sd_bank
    with pytest.warns(KohyaTextEncoderWarning, match="--format diffusers"):
        write_adapter(adapters["kohya"], tmp_path / "k", format="kohya")
    assert any("text-encoder" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    unet_only = LoraAdapter({k: m for k, m in adapters["kohya"].modules.items() if k.startswith("unet.")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", KohyaTextEncoderWarning)
        write_adapter(unet_only, tmp_path / "u", format="kohya")  # no text encoder: no warning
        bank.export("diffusers", tmp_path / "d.safetensors", format="diffusers")
    with pytest.warns(KohyaTextEncoderWarning):
        bank.export("diffusers", tmp_path / "e.safetensors", format="kohya")


# --------------------------------------------------------------------- items 3 and 4: PEFT clients and servers


@pytest.fixture(scope="module")
def llm_bank(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any, peft_adapter: Any) -> tuple[Bank, Path]:
    """PEFT CAUSAL_LM adapters of a tiny Llama saved to disk, with mixed ranks (6+8 on q_proj, 2+6 elsewhere)."""
    root = tmp_path_factory.mktemp("llm")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    bank = Bank.init(root / "bank")
    variants = [dict(r=6, target_modules=["q_proj", "v_proj", "down_proj"]),
                dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"q_proj": 8}),
                dict(r=4, target_modules=["k_proj"], use_rslora=True)]
    for i, v in enumerate(variants):
        path = peft_adapter(base, root / f"a{i}", seed=40 + i, base_id=str(root / "base"), task_type="CAUSAL_LM", **v)
        bank.add(path, id=f"a{i}", prototype=Prototype(np.random.default_rng(i).normal(size=8), SPACE, source=f"a{i}"))
    return bank, root


def reference_logits(root: Path, bank: Bank, weights: dict[str, float], ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(root / "base").eval()
    sd = ref.state_dict()
    for i, w in weights.items():
        for m, mod in bank.load_adapter(i).modules.items():
            sd[f"{m}.weight"] = sd[f"{m}.weight"] + w * mod.delta()
    ref.load_state_dict(sd)
    with torch.inference_mode():
        return ref(ids).logits


def test_auto_peft_model_loads_composite(llm_bank: Any, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    bank, root = llm_bank
    comp = compose(bank, Prototype(np.ones(8), SPACE), strategy="lin", ids=["a0", "a1", "a2"])
    out = comp.save(tmp_path / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(root / "base")
    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = model(ids).logits
    want = reference_logits(root, bank, dict(zip(comp.ids, comp.weights.tolist())), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# vLLM's adapter-config checks, reimplemented from vllm/lora/peft_helper.py (PEFTHelper.from_dict, __post_init__,
# _validate_features, validate_legal, get_rank_and_scaling) and vllm/config/lora.py (MaxLoRARanks). Older vLLM
# (before rank_pattern support) compares only `r` with max_lora_rank and serves every module at rank r.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_validate(cfg: dict[str, Any], max_lora_rank: int, *, legacy: bool) -> None:
    assert max_lora_rank in VLLM_MAX_LORA_RANKS
    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise ValueError(f"Missing required configuration fields: {missing}")
    if cfg["r"] <= 0:
        raise ValueError("LoRA rank `r` must be a positive integer")
    errors = []
    if cfg.get("modules_to_save"):
        errors.append("modules_to_save")
    if cfg.get("use_dora"):
        errors.append("DoRA")
    if cfg.get("lora_bias"):
        errors.append("lora_bias")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        errors.append("init_lora_weights")
    for k in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if cfg.get(k):
            errors.append(k)
    max_rank = cfg["r"] if legacy else max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])
    if max_rank > max_lora_rank:
        errors.append(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise ValueError(" ".join(errors))


def vllm_rank_and_scaling(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    def match(pattern: dict[str, Any]) -> Any:
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), None)

    rank = match(cfg.get("rank_pattern") or {}) or cfg["r"]
    alpha = match(cfg.get("alpha_pattern") or {})
    alpha = cfg["lora_alpha"] if alpha is None else alpha
    return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def test_composite_config_passes_vllm_checks(llm_bank: Any, tmp_path: Path) -> None:
    bank, _ = llm_bank
    comp = compose(bank, Prototype(np.ones(8), SPACE), strategy="avg", ids=["a0", "a1", "a2"])
    ranks = comp.adapter.ranks
    assert sorted(set(ranks.values())) == [4, 8, 14]  # k_proj 4, v/down 6+2, q 6+8
    out = comp.save(tmp_path / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 14 == max(ranks.values())
    assert all(v < cfg["r"] for v in cfg["rank_pattern"].values())
    for legacy in (True, False):
        vllm_validate(cfg, 16, legacy=legacy)
        with pytest.raises(ValueError, match="greater than max_lora_rank 8"):
            vllm_validate(cfg, 8, legacy=legacy)
    back = read_adapter(out)
    for name, m in back.modules.items():
        r, s = vllm_rank_and_scaling(cfg, name)
        assert (r, s) == (m.rank, pytest.approx(m.scale)), name
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["rank"]["needed_to_serve"] == 14 and recipe["rank"]["vllm_max_lora_rank"] == 16


def test_max_rank_truncates_only_modules_above(llm_bank: Any, tmp_path: Path) -> None:
    bank, _ = llm_bank
    target = Prototype(np.ones(8), SPACE)
    full = compose(bank, target, strategy="avg", ids=["a0", "a1", "a2"])
    cut = compose(bank, target, strategy="avg", ids=["a0", "a1", "a2"], max_rank=8)
    above = sorted(k for k, r in full.adapter.ranks.items() if r > 8)
    assert above and sorted(cut.truncation_error) == above  # errors only for the truncated modules
    for name, m in cut.adapter.modules.items():
        d_full = full.adapter.modules[name].delta(torch.float64)
        if name in above:
            assert m.rank == 8
            rel = float((m.delta(torch.float64) - d_full).norm() / d_full.norm())
            s = torch.linalg.svdvals(d_full)
            assert rel == pytest.approx(float(s[8:].norm() / s.norm()), rel=1e-3, abs=1e-6)
            assert cut.truncation_error[name] == pytest.approx(rel, rel=1e-3, abs=1e-6)
        else:
            f = full.adapter.modules[name]
            assert torch.equal(m.A, f.A) and torch.equal(m.B, f.B) and m.scale == f.scale  # untouched, bit for bit
    out = cut.save(tmp_path / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    vllm_validate(cfg, 8, legacy=True)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["truncation"]["max_rank"] == 8 and sorted(recipe["truncation"]["per_module"]) == above
    with pytest.raises(ParameterError, match="max_rank"):
        compose(bank, target, strategy="avg", ids=["a0"], max_rank=0)
    with pytest.raises(ParameterError, match="not both"):
        compose(bank, target, strategy="avg", ids=["a0"], max_rank=4, rank=4)


def test_cli_prints_serving_rank_and_max_rank(llm_bank: Any, tmp_path: Path) -> None:
    bank, _ = llm_bank
    p = proto(tmp_path, 1)
    res = cli("compose", bank.root, "--prototype", p, "--ids", "a0,a1,a2", "--strategy", "avg", "-o", tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "rank needed to serve: 14" in res.stdout and "Wrote peft composite" in res.stdout
    res = cli("compose", bank.root, "--prototype", p, "--ids", "a0,a1,a2", "--strategy", "avg", "--max-rank", "8",
              "-o", tmp_path / "m")
    assert res.returncode == 0, res.stderr
    assert "max rank 8:" in res.stdout and "rank needed to serve: 8" in res.stdout
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["r"] == 8
