"""``adapterbank grasp`` commands: ``train CONFIG.yaml`` and ``sample CKPT --labels ...``.

The app is thin: parse → validate → call one library function (:mod:`adapterbank.grasp.recipe`) → print.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.table import Table

from adapterbank.cli.render import console, print_error
from adapterbank.errors import AdapterbankError

app = typer.Typer(help="GRASP: group residual adapters routed by a static partition.", no_args_is_help=True)


def _fail(e: Exception) -> None:
    print_error(e)
    raise typer.Exit(code=2)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config (sections model, data, partitioner, adapter, train, output)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log per-group losses."),
) -> None:
    """Fit the partitioner, inject group adapters, train them and save the checkpoint."""
    from adapterbank.grasp.recipe import load_config, train_from_config

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg, root = load_config(config)
        handle, res, out = train_from_config(cfg, root, progress=progress)
    except (AdapterbankError, FileNotFoundError) as e:
        _fail(e)
        return
    t = Table(title=f"GRASP checkpoint {out}")
    for col in ("group", "labels", "updates", "last loss"):
        t.add_column(col)
    last = res.history[-1].get("group_loss", {}) if res.history else {}
    labs = handle.partitioner.groups_of_labels()
    for g, name in enumerate(handle.group_names):
        loss = last.get(str(g))
        t.add_row(name, ", ".join(labs.get(name, [])[:8]), str(res.group_updates[g]),
                  "-" if loss is None else f"{loss:.4f}")
    console.print(t)
    console.print(f"{handle.n_params():,} adapter parameters, median step {1000 * res.median_step_time:.1f} ms")


@app.command("sample")
def sample_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder written by 'adapterbank grasp train'."),
    labels: str = typer.Option(..., "--labels", help="Comma-separated class labels, one image each (e.g. 0,3,3)."),
    out: Path = typer.Option(Path("grasp-samples.npz"), "--out", help="Output .npz (arrays x, labels, groups)."),
    steps: int = typer.Option(20, help="Euler steps."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Noise seed."),
) -> None:
    """Generate one image per label, each routed to its label's group adapter."""
    import numpy as np

    from adapterbank.grasp.recipe import sample_checkpoint

    try:
        ys = [int(v) for v in labels.split(",") if v.strip()]
    except ValueError:
        _fail(ValueError(f"--labels must be comma-separated integers. Got {labels!r}."))
        return
    if not ys:
        _fail(ValueError("--labels is empty."))
    try:
        imgs, groups = sample_checkpoint(ckpt, ys, steps=steps, cfg_scale=cfg_scale, seed=seed)
    except (AdapterbankError, FileNotFoundError) as e:
        _fail(e)
        return
    np.savez(out, x=imgs.numpy(), labels=np.array(ys), groups=np.array(groups))
    console.print(json.dumps({"out": str(out), "n": len(ys), "groups": groups}))
