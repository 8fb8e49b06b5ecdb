"""The ``adapterbank`` app and its bank, compose and demo commands; :func:`main` runs it.

Only this package (:mod:`adapterbank.cli`) configures logging and prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from adapterbank.cli.common import PARAM_HELP, PLUGIN_HELP, csv_list, strategy_params
from adapterbank.cli.evaluate import evaluate_cmd
from adapterbank.cli.render import (
    card_table,
    console,
    json_option,
    print_error,
    print_json,
    score_table,
    show_warning,
    weights_table,
)
from adapterbank.cli.tune import tune_cmd
from adapterbank.errors import AdapterbankError, ParameterError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar, every command


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A bank of LoRA adapters with task prototypes: retrieve, weigh (sparse projection), merge exactly.")

BANK_HELP = "The bank: a folder (embedded) or a postgresql:// URL (server backend)."


# --- helpers -----------------------------------------------------------------------------------

def _open(bank: str | Path, lock_timeout: float | None = None) -> Any:
    from adapterbank.bank import Bank

    return Bank.open(bank) if lock_timeout is None else Bank.open(bank, lock_timeout=lock_timeout)


def _is_bank(value: str) -> bool:
    """Whether ``value`` names a bank (a server URL, or a folder with a catalog) rather than a file of samples."""
    return "://" in value or (Path(value) / "catalog.sqlite").is_file()


LOCK_TIMEOUT_HELP = "Seconds to wait while another process writes to the bank (default 60), then fail."
OVERWRITE_HELP = "Replace an existing output (atomically: the old content stays until the new one is complete)."


def _bank_encoder(bank: Any) -> tuple[str | None, int | None]:
    """The encoder spec the bank's prototypes were made with (:meth:`Bank.encoders`), and their ``--max-length``
    if it was not the default (read from the recorded space keys, which end in ``|maxN`` then)."""
    if bank is None:
        return None, None
    data = bank.encoders()
    specs = sorted(set(data.values()))
    if len(specs) > 1:
        raise typer.BadParameter(f"The bank has prototypes from several encoders {specs}; pass --encoder.")
    if not specs:
        return None, None
    from adapterbank.prototypes.space import PrototypeSpace

    lengths = sorted({PrototypeSpace.max_length_of_key(key) for key in data}, key=lambda n: -1 if n is None else n)
    if len(lengths) > 1:
        shown = ", ".join("the default" if n is None else str(n) for n in lengths)
        raise typer.BadParameter(f"The bank has prototypes made with several --max-length values ({shown}); "
                                 "pass --max-length.")
    return specs[0], lengths[0]


def _encoder(spec: str | None, bank: Any = None, max_length: int | None = None) -> tuple[Any, str]:
    """The encoder to use: ``spec`` (else the bank's, else ``default``), reading ``max_length`` tokens per text
    (else what the bank's prototypes were made with, when the bank's encoder is used)."""
    from adapterbank.prototypes import load_encoder

    if spec is None:
        spec, bank_max = _bank_encoder(bank)
        max_length = max_length if max_length is not None else bank_max
    spec = spec or "default"
    return load_encoder(_local(spec, "--encoder"), max_length=max_length), spec


def _target(bank: Any, target: Path | None, description: str | None, prototype: Path | None,
            encoder: str | None, column: str | None, batch_size: int = 32, max_length: int | None = None) -> Any:
    """A target prototype from samples, a description or a prototype file (exactly one)."""
    from adapterbank.prototypes import Prototype, compute_prototype, describe

    given = [x is not None for x in (target, description, prototype)]
    if sum(given) != 1:
        raise typer.BadParameter("Give exactly one of --target SAMPLES, --description TEXT, --prototype FILE.npy.")
    if prototype is not None:
        if max_length is not None:
            raise typer.BadParameter("--max-length sets the encoder; a --prototype file was computed already.")
        return Prototype.load(prototype)
    _local(target, "--target")  # before the encoder loads
    enc, _ = _encoder(encoder, bank, max_length)
    if description is not None:
        return describe(enc, description)
    return compute_prototype(enc, target, column=column, batch_size=batch_size, progress=sys.stderr.isatty())


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".pq", ".txt", ".npy", ".safetensors",
                  ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".py", ".yaml")


def _local(value: Any, flag: str) -> Any:
    """``value`` unchanged, unless it names nothing on disk but looks like a Hugging Face hub id (``org/name``):
    then a ParameterError saying how to download it, since adapterbank never downloads (it runs offline)."""
    if value is None:
        return value
    s = os.fspath(value)
    if Path(s).expanduser().exists() or not _HUB_ID.fullmatch(s) or s.lower().endswith(_FILE_SUFFIXES):
        return value
    raise ParameterError(
        f"{flag} {s!r} is not a local file or folder. adapterbank works offline and never downloads: if {s!r} is "
        f"a Hugging Face hub id, download it first with `hf download {s} --local-dir DIR` (`huggingface-cli "
        f"download {s} --local-dir DIR` with huggingface_hub < 1.0), then pass DIR as {flag}.")


# The format table lives in adapterbank.formats (it imports torch): --help names the command that lists it.
_FORMATS_HINT = "a name from `adapterbank formats`"


# --- commands ----------------------------------------------------------------------------------

@app.command()
def init(bank: str = typer.Argument(..., help="Directory to create the bank in, or a postgresql:// URL (server "
                                     "backend; blobs at --blobs or $ADAPTERBANK_BLOBS)."),
         blobs: Optional[str] = typer.Option(None, "--blobs", help="Server backend: fsspec URL of the blob store "
                                             "(default $ADAPTERBANK_BLOBS), e.g. s3://bucket/adapterbank.")) -> None:
    """Create an empty bank (SQLite catalog + content-addressed blobs, or PostgreSQL + object storage)."""
    from adapterbank.bank import Bank

    b = Bank.init(bank, blobs=blobs)
    console.print(f"Initialised bank at [bold]{b.root}[/bold] (blobs: {b.blobs_location})")


@app.command("formats")
def formats_cmd(json_out: bool = json_option()) -> None:
    """List the adapter file formats (name, layout, default composite format) from the formats table."""
    from adapterbank.formats import FORMATS

    rows = [{"name": f.name, "description": f.description, "composites_as": f.family, "single_file": f.single_file}
            for f in FORMATS.values()]
    if json_out:
        print_json(rows)
        return
    t = Table(title="adapter formats")
    for c in ("name", "layout", "composites written as"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["description"], r["composites_as"])
    console.print(t)


@app.command()
def add(
    bank: str = typer.Argument(..., help=BANK_HELP),
    sources: Optional[list[str]] = typer.Argument(
        None, metavar="SOURCE...", show_default=False,
        help="Adapters: PEFT folders, kohya/diffusers .safetensors files, folders to scan for them, glob patterns "
             "(quoted globs are expanded here, ** recurses). One adapter takes the per-adapter options below."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="JSONL, one adapter per line: {\"source\": ..., \"id\", \"description\" or "
        "\"samples\", \"tags\", \"base\", \"license\", \"source_url\"} (all but source optional; relative "
        "paths are read from the manifest's folder)."),
    id: Optional[str] = typer.Option(None, "--id", help="Adapter id (default: the folder/file name)."),
    samples: Optional[Path] = typer.Option(None, help="JSONL/CSV/Parquet file or image folder of the task's data."),
    description: Optional[str] = typer.Option(None, help="Text description (prototype for adapters without data)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder: a HF/sentence-transformers model dir, 'default', or module:function."),
    column: Optional[str] = typer.Option(None, help="Text column of --samples."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model id (checked against the adapter's)."),
    format: Optional[str] = typer.Option(None, help=f"Adapter format, {_FORMATS_HINT} (default: detect)."),
    tags: Optional[str] = typer.Option(None, help="Comma-separated tags."),
    license: Optional[str] = typer.Option(None),
    source_url: Optional[str] = typer.Option(None),
    allow_pickle: bool = typer.Option(False, help="Convert a pickle (.bin/.pt/.ckpt) file in a sandboxed subprocess."),
    replace: bool = typer.Option(False, help="Replace an existing adapter with the same id (an unchanged one is "
                                 "left as it is when several are added)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Several adapters: adapters per catalog transaction and per encoder call (default "
        "256). One adapter with --samples: samples per forward pass (default 32)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Several adapters: threads that copy, hash "
                                          "and check them (default: 4 per core, at most 16)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Tokens the text encoder reads per text (default 256, or a sentence-transformers model's own); recorded in the prototype space."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", metavar="SECONDS", help=LOCK_TIMEOUT_HELP),
    json_: bool = json_option(),
) -> None:
    """Add adapters (and their task prototypes) to the bank: one, or many at once (folders, globs, --manifest).

    Many: a bad one is reported and skipped; one the bank has with the same files is skipped (a rerun resumes).
    Exit code 1 if any was refused.
    """
    sources = list(sources or [])
    if not sources and manifest is None:
        raise typer.BadParameter("Give at least one SOURCE (an adapter, a folder, a glob) or --manifest FILE.jsonl.")
    if manifest is None and len(sources) == 1 and _one_adapter(sources[0]):
        return _add_one(bank, Path(sources[0]), id=id, samples=samples, description=description, encoder=encoder,
                        column=column, base=base, format=format, tags=tags, license=license, source_url=source_url,
                        allow_pickle=allow_pickle, replace=replace, batch_size=32 if batch_size is None else batch_size,
                        max_length=max_length, lock_timeout=lock_timeout, json_out=json_)
    for flag, value in (("--id", id), ("--samples", samples), ("--description", description),
                        ("--source-url", source_url), ("--column", column)):
        if value is not None:
            raise typer.BadParameter(f"{flag} describes one adapter; to add several, give it per adapter in a "
                                     "--manifest row.")
    _add_many(bank, sources, manifest, encoder=encoder, base=base, format=format, tags=tags, license=license,
              allow_pickle=allow_pickle, replace=replace, batch_size=batch_size, workers=workers,
              max_length=max_length, lock_timeout=lock_timeout, json_out=json_)


def _one_adapter(source: str) -> bool:
    """Whether SOURCE is one adapter (the single-adapter form of ``add``) rather than a folder or glob to scan."""
    import glob

    from adapterbank.errors import FormatError, UnsafeFileError
    from adapterbank.formats import detect_format

    p = Path(source)
    if not p.exists():
        return not glob.has_magic(source)  # a missing path: the single form says so, as it always did
    if not p.is_dir():
        return True
    try:
        detect_format(p)
    except UnsafeFileError:
        return True  # a pickle in a folder: one adapter (--allow-pickle converts it)
    except (FormatError, OSError):
        return False
    return True


def _add_one(bank: str, source: Path, *, id: str | None, samples: Path | None, description: str | None,
             encoder: str | None, column: str | None, base: str | None, format: str | None, tags: str | None,
             license: str | None, source_url: str | None, allow_pickle: bool, replace: bool, batch_size: int,
             max_length: int | None, lock_timeout: float | None, json_out: bool) -> None:
    """``adapterbank add BANK SOURCE``: one adapter, as before bulk adds existed."""
    import time

    from adapterbank.bank.ingest import IngestReport
    from adapterbank.prototypes import compute_prototype, describe

    t0 = time.perf_counter()
    if max_length is not None and samples is None and description is None:
        raise typer.BadParameter("--max-length sets the encoder of --samples or --description; give one of them.")
    b = _open(bank, lock_timeout)
    source, samples = _local(source, "SOURCE"), _local(samples, "--samples")
    proto = None
    if samples is not None or description is not None:
        enc, spec = _encoder(encoder, b, max_length)
        if samples is not None:
            proto = compute_prototype(enc, samples, column=column, batch_size=batch_size, progress=sys.stderr.isatty(),
                                      description=description)
        else:
            proto = describe(enc, description)
        b.remember_encoder(proto.space.key, spec)
    n_before = len(b)
    card = b.add(source, id=id, prototype=proto, description=description, tags=csv_list(tags), license=license,
                 source_url=source_url, base_model=base, format=format, allow_pickle=allow_pickle, replace=replace)
    if json_out:
        rep = IngestReport(added=[card.id], replaced=[card.id] if replace and len(b) == n_before else [],
                           encoded=int(proto is not None),
                           elapsed_s=time.perf_counter() - t0)
        return print_json(rep.to_dict())
    console.print(f"Added [bold]{card.id}[/bold] ({card.format}, base {card.base_model}, rank {card.rank}, "
                  f"{len(card.targets)} modules)" + (f", prototype in {proto.space.key}" if proto else ", no prototype"))


def _add_many(bank: str, sources: list[str], manifest: Path | None, *, encoder: str | None, base: str | None,
              format: str | None, tags: str | None, license: str | None, allow_pickle: bool, replace: bool,
              batch_size: int | None, workers: int | None, max_length: int | None, lock_timeout: float | None,
              json_out: bool) -> None:
    """``adapterbank add BANK SOURCE... [--manifest M]``: many adapters, one encoder, a progress bar, a summary."""
    import glob

    from rich.markup import escape

    from adapterbank.bank.ingest import IngestItem, Refusal, expand_sources, read_manifest
    from adapterbank.bank.store import is_url
    from adapterbank.cli.render import err

    defaults: dict[str, Any] = {"tags": csv_list(tags), "base_model": base, "license": license, "format": format}
    items: list[IngestItem] = []
    empty: list[Refusal] = []
    for s in sources:
        if not glob.has_magic(s):
            _local(s, "SOURCE")
        found = expand_sources([s])
        if not found:
            empty.append(Refusal(s, None, "FormatError", f"{s}: no adapters in it (PEFT folders with "
                                 "adapter_config.json, .safetensors files)."))
        items += [IngestItem(p, **defaults) for p in found]
    if manifest is not None:
        items += read_manifest(_local(manifest, "--manifest"), defaults=defaults)
    wants_encoder = any(it.description is not None or it.samples is not None for it in items)
    if max_length is not None and not wants_encoder:
        raise typer.BadParameter("--max-length sets the encoder of the manifest's descriptions or samples; "
                                 "there are none.")
    b = _open(bank, lock_timeout)
    enc, spec = _encoder(encoder, b, max_length) if wants_encoder else (None, None)  # one encoder for the run
    with _ingest_progress(len(items), enabled=sys.stderr.isatty()) as advance:
        rep = b.add_many(items, replace=replace, batch_size=256 if batch_size is None else batch_size,
                         workers=workers, encoder=enc, progress=advance, allow_pickle=allow_pickle)
    if enc is not None and rep.encoded:
        b.remember_encoder(enc.space.key, spec)
    if rep.added and not is_url(bank):
        # Bring the persisted search index up to date now, so that the next `search`/`compose` process starts
        # at once instead of paying for it (an ANN graph over 1e6 prototypes takes minutes to build).
        for space in b.spaces():
            with err.status(f"indexing {space.key}") if sys.stderr.isatty() else contextlib.nullcontext():
                b.index(space)
    rep.refused += empty
    if json_out:
        print_json(rep.to_dict())
    else:
        console.print(rep.summary())
        for r in rep.refused:
            err.print(f"[red]refused[/red] {escape(r.reason)}")
    raise typer.Exit(0 if rep.ok else 1)


@contextlib.contextmanager
def _ingest_progress(total: int, *, enabled: bool, console: Any = None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar (done/total, adapters/s, ETA) on stderr (or ``console``) when ``enabled``; yields its
    ``advance(n)``."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from adapterbank.cli.render import err

    with Progress(TextColumn("adding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console or err) as bar:
        task = bar.add_task("add", total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.0f} adapters/s" if speed else "")

        yield advance


@app.command("list")
def list_(bank: str, base: Optional[str] = typer.Option(None, "--base"), tag: Optional[str] = typer.Option(None),
          json_: bool = json_option()) -> None:
    """List the adapters in the bank."""
    cards = _open(bank).list(base_model=base, tags=csv_list(tag) or None)
    if json_:
        return print_json([c.to_dict() for c in cards])
    console.print(card_table(cards))


@app.command()
def show(bank: str, id: str, json_: bool = json_option()) -> None:
    """Show one adapter's card as JSON."""
    card = _open(bank).get(id).to_dict()
    if json_:
        return print_json(card)
    console.print_json(json.dumps(card, default=str))


@app.command()
def remove(bank: str, id: str, lock_timeout: Optional[float] = typer.Option(
        None, "--lock-timeout", metavar="SECONDS", help=LOCK_TIMEOUT_HELP)) -> None:
    """Remove an adapter; its blobs are deleted at once unless another adapter shares them."""
    _open(bank, lock_timeout).remove(id)
    console.print(f"Removed {id}")


@app.command()
def migrate(
    src: str = typer.Argument(..., help="The bank to copy: a folder or a postgresql:// URL."),
    dst: str = typer.Argument(..., help="The bank to copy into (a folder is created if absent; a URL must have been "
                                        "set up with `adapterbank init URL`)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Cards committed per transaction."),
    json_out: bool = json_option(),
) -> None:
    """Copy every card, prototype, setting and blob of SRC into DST (any backends), then verify DST; resumable."""
    from adapterbank.bank import Bank
    from adapterbank.bank.migrate import migrate as run_migrate
    from adapterbank.bank.store import is_url

    a = _open(src)
    if not is_url(dst) and (not Path(dst).exists() or (Path(dst).is_dir() and not any(Path(dst).iterdir()))):
        b = Bank.init(dst)
    else:
        b = _open(dst)
    rep = run_migrate(a, b, batch_size=batch_size)
    if json_out:
        print_json({"copied": len(rep.copied), "already_present": len(rep.present), "refused": rep.refused,
                    "blobs_copied": rep.blobs_copied, "settings_copied": rep.settings_copied,
                    "seconds": round(rep.seconds, 3), "verified": rep.verified, "problems": rep.problems})
    else:
        for i, why in rep.refused:
            console.print(f"[red]refused {i}: {why}[/red]")
        for p in rep.problems:
            console.print(f"[red]{p}[/red]")
        console.print(f"migrated {a.root} -> {b.root}: {len(rep.copied)} copied, {len(rep.present)} already present, "
                      f"{len(rep.refused)} refused, {rep.blobs_copied} blobs, {rep.settings_copied} settings, "
                      f"{rep.seconds:.1f} s; verify: " + ("[green]ok[/green]" if rep.ok else "[red]FAILED[/red]"))
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def verify(bank: str) -> None:
    """Re-hash every blob and check the catalog; exit 1 on damage."""
    rep = _open(bank).verify()
    for p in rep.problems:
        console.print(f"[red]{p}[/red]")
    console.print(f"checked {rep.checked} blobs: " + ("[green]ok[/green]" if rep.ok else "[red]DAMAGED[/red]"))
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
def gc(bank: str, lock_timeout: Optional[float] = typer.Option(
        None, "--lock-timeout", metavar="SECONDS", help=LOCK_TIMEOUT_HELP)) -> None:
    """Delete orphan blobs and temp files left by interrupted writes."""
    console.print(f"removed {_open(bank, lock_timeout).gc()} orphan files")


@app.command()
def export(bank: str, id: str, out: Path = typer.Option(..., "-o", "--out"),
           format: Optional[str] = typer.Option(None, help=f"Output format, {_FORMATS_HINT} (default: as added, bit-for-bit)."),
           overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)) -> None:
    """Write an adapter from the bank to a folder/file."""
    path = _open(bank).export(id, out, format=format, overwrite=overwrite)
    console.print(f"Wrote {path}")


@app.command()
def prototype(
    bank: Optional[str] = typer.Argument(None, help="Bank (to reuse its encoder); optional."),
    samples: Optional[Path] = typer.Argument(None, help="JSONL/CSV/Parquet file or image folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .npy (a .npy.json sidecar records the space)."),
    description: Optional[str] = typer.Option(None),
    encoder: Optional[str] = typer.Option(None),
    column: Optional[str] = typer.Option(None),
    batch_size: int = typer.Option(32),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Tokens the text encoder reads per text (default 256, or a sentence-transformers model's own); recorded in the prototype space."),
) -> None:
    """Compute a task prototype (Eq. 1) from samples or a description."""
    if bank is not None and samples is None and not _is_bank(bank):
        bank, samples = None, Path(bank)  # `adapterbank prototype SAMPLES -o x.npy`
    _local(samples, "SAMPLES")
    p = _target(None if bank is None else _open(bank), samples, description, None, encoder, column, batch_size, max_length)
    path = p.save(out)
    console.print(f"Wrote {path} (dim {p.dim}, {p.n_samples} samples, space {p.space.key})")


@app.command()
def search(
    bank: str = typer.Argument(..., help=BANK_HELP),
    target: Optional[Path] = typer.Option(None, help="Samples of the target task."),
    description: Optional[str] = typer.Option(None),
    prototype: Optional[Path] = typer.Option(None, help="A prototype .npy from `adapterbank prototype`."),
    k: int = typer.Option(5, "-k"),
    base: Optional[str] = typer.Option(None, "--base"),
    tag: Optional[str] = typer.Option(None),
    encoder: Optional[str] = typer.Option(None),
    column: Optional[str] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Tokens the text encoder reads per text (default 256, or a sentence-transformers model's own); recorded in the prototype space."),
    json_: bool = json_option(),
) -> None:
    """The k nearest adapters to a target prototype."""
    b = _open(bank)
    p = _target(b, target, description, prototype, encoder, column, max_length=max_length)
    hits = b.search(p, k=k, base_model=base, tags=csv_list(tag) or None)
    if json_:
        return print_json({"space": p.space.key, "k": k, "hits": [{"id": h.id, "distance": h.distance} for h in hits]})
    t = Table(title=f"top-{k} in {p.space.key}")
    t.add_column("adapter")
    t.add_column("squared distance", justify="right")
    for h in hits:
        t.add_row(h.id, f"{h.distance:.6g}")
    console.print(t)


@app.command("compose")
def compose_cmd(
    bank: str = typer.Argument(..., help=BANK_HELP),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for the composite adapter."),
    target: Optional[Path] = typer.Option(None, help="Samples of the target task (JSONL/CSV/Parquet/images)."),
    description: Optional[str] = typer.Option(None, help="Text description of the target task."),
    prototype: Optional[Path] = typer.Option(None, help="A target prototype .npy."),
    k: Optional[int] = typer.Option(None, "-k", help="How many adapters to retrieve (default 5; with --strategy "
                                    "auto, the tuned k)."),
    strategy: str = typer.Option("sparse", help="avg, sim, lin, sparse, nearest, one a --strategy-plugin "
                                 "registers (adapterbank.compose.STRATEGIES), or auto: the setting `adapterbank "
                                 "tune` chose for this bank (untuned: sim, with a warning)."),
    param: Optional[list[str]] = typer.Option(None, "--param", help=PARAM_HELP),
    strategy_plugin: Optional[list[str]] = typer.Option(None, "--strategy-plugin", help=PLUGIN_HELP),
    lam: Optional[float] = typer.Option(None, help="Sparse: absolute λ (default: scale-free, see --lam-rel)."),
    lam_rel: Optional[float] = typer.Option(None, help="Sparse: λ relative to the distance scale."),
    lam_frac: Optional[float] = typer.Option(None, help="Sparse: λ = F·λ_max, F in [0, 1] (0: Lin, 1: the "
                                             "convex-hull projection)."),
    tau: Optional[float] = typer.Option(None, help="Sim: absolute temperature τ."),
    tau_rel: Optional[float] = typer.Option(None, help="Sim: τ relative to the median distance."),
    base: Optional[str] = typer.Option(None, "--base", help="Only adapters of this base model."),
    tag: Optional[str] = typer.Option(None, help="Only adapters with these comma-separated tags."),
    exclude: Optional[str] = typer.Option(None, help="Comma-separated ids to leave out."),
    ids: Optional[str] = typer.Option(None, help="Compose exactly these ids (no retrieval)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Truncate each module exactly to this rank."),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="Fit a server's max_lora_rank: truncate only "
                                           "the modules above this rank (exactly; their error is printed)."),
    format: Optional[str] = typer.Option(None, help=f"Output format, {_FORMATS_HINT} (default: follow the "
                                         "inputs; kohya/diffusers inputs give diffusers, PEFT inputs peft)."),
    merge_into: Optional[Path] = typer.Option(None, help="Also write full merged weights of this base model folder."),
    lambda_path: bool = typer.Option(False, help="Store the whole λ-path of the sparse solution in the recipe."),
    merge: str = typer.Option("linear", "--merge", help="How the weighted ΔW_i are combined per module: linear "
                              "(Eq. 6, exact), ties, dare_linear, dare_ties or magnitude_prune (re-factored by SVD "
                              "at rank Σ r_i or --rank; error printed)."),
    merge_param: Optional[list[str]] = typer.Option(None, "--merge-param", help="NAME=VALUE for --merge, repeatable: "
                                                    "density (0.5), majority_sign_method (total), seed (0)."),
    encoder: Optional[str] = typer.Option(None),
    column: Optional[str] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Tokens the text encoder reads per text (default 256, or a sentence-transformers model's own); recorded in the prototype space."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json_: bool = json_option(),
) -> None:
    """Retrieve, weigh and merge adapters for a target task into one composite adapter."""
    from adapterbank.compose import RECIPE_FILE, compose
    from adapterbank.compose.compose import default_output_format

    legacy = {n: v for n, v in (("lam", lam), ("lam_rel", lam_rel), ("lam_frac", lam_frac), ("tau", tau),
                                ("tau_rel", tau_rel)) if v is not None}
    if strategy == "auto" and (param or legacy):
        raise ParameterError("--strategy auto takes its parameters from the bank's tuned setting; drop --param/"
                             "--lam/--lam-rel/--lam-frac/--tau/--tau-rel, or give a strategy (--strategy sparse, ...).")
    _, by_strategy = strategy_params(strategy_plugin, param, [] if strategy == "auto" else [strategy],
                                     {strategy: legacy} if legacy else {})
    params = by_strategy.get(strategy, {})
    merge_params = _merge_params(merge, merge_param)
    b = _open(bank)
    _local(merge_into, "--merge-into")
    p = _target(b, target, description, prototype, encoder, column, max_length=max_length)
    comp = compose(b, p, k=k, strategy=strategy, params=params, base_model=base, tags=csv_list(tag) or None,
                   exclude=csv_list(exclude), ids=csv_list(ids) or None, rank=rank, max_rank=max_rank,
                   lambda_path=lambda_path, merge=merge, merge_params=merge_params)
    path = comp.save(out, format=format, merge_into=merge_into, overwrite=overwrite)
    fmt = default_output_format(comp.source_formats, format)
    if json_:
        return print_json({"out": str(path), "format": fmt, **json.loads((path / RECIPE_FILE).read_text())})
    eff = ", ".join(f"{k_}={v:.4g}" for k_, v in comp.params.items())
    if comp.auto is not None:
        console.print(f"auto -> {comp.strategy}, k={comp.k} ({comp.auto['source']})")
    console.print(weights_table(f"{comp.strategy} weights ({eff or 'no parameters'}; solver: {comp.status})",
                                 comp.weight_table()))
    if comp.truncation_error:
        errs = comp.truncation_error.values()
        what = f"max rank {max_rank}: {len(errs)} modules truncated" if max_rank is not None else f"rank {rank}"
        if merge != "linear":
            eff = ", ".join(f"{k_}={v}" for k_, v in comp.merge_params.items())
            what = f"merge {merge} ({eff}), {len(errs)} modules re-factored at rank {rank or max_rank or 'Σ r_i'}"
        console.print(f"{what}: relative Frobenius error max {max(errs):.3e}, mean {sum(errs) / len(errs):.3e}")
    ri = comp.rank_info()
    console.print(f"rank needed to serve: {ri['needed_to_serve']} (largest module rank; vLLM --max-lora-rank "
                  f"{ri['vllm_max_lora_rank'] or '> 512, use --max-rank'})")
    console.print(f"Wrote {fmt} composite to [bold]{path}[/bold] (recipe in composition.json)")


def _merge_params(merge: str, specs: Optional[list[str]]) -> dict[str, Any]:
    """``--merge-param NAME=VALUE`` options as the method's effective parameters (checked against its row)."""
    from adapterbank.compose.merge_methods import get_merge_method

    given: dict[str, str] = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--merge-param must be NAME=VALUE (e.g. density=0.2). Got {spec!r} instead.")
        given[name.strip()] = value.strip()
    return get_merge_method(merge).resolve(given)


app.command("evaluate")(evaluate_cmd)
app.command("tune")(tune_cmd)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "-o", "--out", help="Output folder: bank/, report/, composites/."),
    k: int = typer.Option(5, "-k", help="Adapters retrieved per target."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated domains to hold out (default: all six)."),
    quick: bool = typer.Option(False, "--quick", help="One target, 20 test pairs, 8 texts per prototype, no PNGs "
                               "(a smoke test; the scores then differ from the benchmark's)."),
    plots: bool = typer.Option(True, help="Write the PNG figures of the report."),
    threads: int = typer.Option(1, help="torch threads (0: torch's default). The demo's matmuls are small: one "
                                "thread ran it 2x faster than two on a 2-core machine."),
) -> None:
    """Leave-one-out composition of six real trained LoRAs (all-MiniLM-L6-v2, docstring search); offline, 1-2 min."""
    import time

    import torch
    from transformers.utils import logging as hf_logging

    from adapterbank.demo import QUICK, run_demo, weight_table
    from adapterbank.evaluate.results import display_name

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the status line
    tgt = csv_list(targets) or (QUICK["targets"] if quick else None)
    extra: dict[str, Any] = ({"n_test": QUICK["n_test"], "proto_n": QUICK["proto_n"], "plots": False} if quick
                             else {"plots": plots})
    threads_before = torch.get_num_threads()
    t0 = time.perf_counter()
    with console.status("starting") as status, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations PEFT triggers

        def step(m: str) -> None:
            status.update(m)
            console.log(m)

        if threads > 0:
            torch.set_num_threads(threads)
        try:
            res = run_demo(out, k=k, targets=tgt, step=step, progress=sys.stderr.isatty(), **extra)
        finally:
            torch.set_num_threads(threads_before)
    results = res.results
    for metric in results.metrics:
        console.print(score_table(results, metric, f"{metric} on each held-out domain's test queries "
                                                   f"(bold: best zero-shot; k={k})"))
    for target in results.targets:
        ids, wrows = weight_table(res, target)
        t = Table(title=f"weights composing '{target}' from the others (d: prototype distance)")
        t.add_column("strategy")
        for i, d in ids:
            t.add_column(f"{i}\nd={d:.3f}", justify="right")
        for name, ws in wrows:
            t.add_row(display_name(name), *[f"{w:+.2f}" if w else "·" for w in ws])
        console.print(t)
    t = Table(title=f"'{res.check_target}': each composite saved as PEFT and loaded with PeftModel.from_pretrained")
    t.add_column("strategy")
    t.add_column("rank", justify="right")
    t.add_column("max |PEFT − (W₀ + Σ w_i ΔW_i)|", justify="right")
    for s, e in res.max_abs_error.items():
        t.add_row(display_name(s), str(res.ranks[s]), f"{e:.1e}")
    console.print(t)
    ok = all(v < 1e-4 for v in res.max_abs_error.values())
    console.print("Every composite matched the dense Σ w_i ΔW_i: "
                  + ("[green]yes[/green]" if ok else "[red]NO[/red]"))
    for note in res.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    stages = ", ".join(f"{a} {b:.0f} s" for a, b in res.seconds.items() if a != "total")
    console.print(f"Report: [bold]{res.report / 'index.html'}[/bold]  (bank and composites in {res.out}; "
                  f"{time.perf_counter() - t0:.0f} s: {stages})")
    raise typer.Exit(0 if ok else 1)


class _GraspGroup(TyperGroup):
    """``adapterbank grasp``: its commands (and torch) are imported when the group is used, not for ``--help``."""

    @cached_property
    def _real(self) -> Any:
        from adapterbank.cli.grasp import app as grasp_app

        return typer.main.get_command(grasp_app)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self._real.list_commands(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return self._real.get_command(ctx, cmd_name)


app.add_typer(typer.Typer(), name="grasp", cls=_GraspGroup, no_args_is_help=True,
              help="GRASP: group residual adapters trained on long-tail data.")


def main() -> None:
    logging.basicConfig(level=os.environ.get("ADAPTERBANK_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = show_warning
    try:
        app()
    except AdapterbankError as e:
        print_error(e)
        sys.exit(2)
    except OSError as e:  # last resort: an operating-system error our library did not word (one line, no traceback)
        print_error(f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror
                    else str(e) or type(e).__name__)
        sys.exit(2)


if __name__ == "__main__":
    main()
