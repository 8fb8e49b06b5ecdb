"""Failure paths of outputs (issue 8, items 7-9 and 12): all-or-nothing folders under ``kill -9``, no silent
overwrite, operating-system errors as one clear line with exit status 2, messages that name the user's files.

Tests run as root in CI (and here), where ``chmod`` stops nothing; the OS errors are therefore made with
mechanisms that bind root too: a path under a regular file (ENOTDIR) and ``ulimit -f`` in a subprocess
(EFBIG, with SIGXFSZ ignored so that the write returns an error instead of killing the process).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adapterbank.bank import Bank
from adapterbank.cli import main
from adapterbank.compose import RECIPE_FILE, compose
from adapterbank.errors import FormatError, OutputExistsError, OutputWriteError
from adapterbank.formats import read_adapter, write_adapter
from adapterbank.lora import LoraAdapter, LoraModule
from adapterbank.prototypes import Prototype, PrototypeSpace

SPACE = PrototypeSpace("toy-encoder", "r1", "mean", False, 8)
#: ``ulimit -f`` of the disk-full tests: above SQLite's 32 KiB -shm file and one adapter of the bank (43 KB),
#: below a composite of two (86 KB).
FSIZE = 64 * 1024


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Any, peft_adapter: Any) -> Path:
    """A bank of three real PEFT adapters with prototypes, a target prototype file and a base model folder."""
    root = tmp_path_factory.mktemp("failure")
    base = tiny_llama()
    rng = np.random.default_rng(0)
    with Bank.init(root / "bank") as bank:
        for i in range(3):
            src = peft_adapter(base, root / "src" / f"a{i}", seed=i, r=48)  # 43 KB: above the ulimit -f below
            bank.add(src, id=f"a{i}", prototype=Prototype(rng.normal(size=8), SPACE, source=f"a{i}"))
        style = LoraAdapter({"unet.conv_in": LoraModule(torch.randn(2, 3), torch.randn(4, 2), 0.5, (4, 3))})
        write_adapter(style, root / "src" / "style.safetensors", format="kohya")
        bank.add(root / "src" / "style.safetensors", id="style")  # a single-file kohya adapter
    Prototype(rng.normal(size=8), SPACE, source="target").save(root / "target.npy")
    base.save_pretrained(root / "base")
    return root


def cli(*args: object) -> tuple[int, str]:
    """Run the console entry point ``main()`` in this process; (exit status, stderr)."""
    import contextlib
    import io

    buf = io.StringIO()
    argv = sys.argv
    sys.argv = ["adapterbank", *map(str, args)]
    code: Any = 0
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return int(code or 0), buf.getvalue()


def cli_subprocess(*args: object, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m adapterbank.cli ARGS`` in a real process; ``fsize``: ``ulimit -f`` in bytes (SIGXFSZ ignored)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored signals stay ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "adapterbank.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if fsize is not None else None)


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed command; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def adapter_files(root: Path) -> dict[str, bytes]:
    return {n: b for n, b in tree(root).items() if n.startswith("adapter_")}  # not PEFT's README.md


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# --- item 7: all or nothing ----------------------------------------------------------------------------------

_WORKER = r"""
import sys, time
import numpy as np, torch
from safetensors.torch import save_file
from adapterbank.compose import Composition
from adapterbank.lora import LoraAdapter, LoraModule

out, base = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
n, d = 24, 512
mods = {f"layers.{i}.proj": LoraModule(torch.randn(8, d, generator=g), torch.randn(d, 8, generator=g), 0.5, (d, d))
        for i in range(n)}
if sys.argv[3] == "make-base":
    save_file({f"layers.{i}.proj.weight": torch.randn(d, d, generator=g) for i in range(n)}, base)
    sys.exit(0)
comp = Composition(LoraAdapter(mods, "toy", {}), ["x"], [0.0], np.ones(1), "avg", {}, "ok", None, {}, 1)
comp.recipe()  # imports peft etc. (seconds) before READY, so that the delays below fall inside the write
import adapterbank.formats, adapterbank.merge
print("READY", flush=True)
t0 = time.perf_counter()
comp.save(out, merge_into=base)
print(f"SAVED {time.perf_counter() - t0:.4f}", flush=True)
"""


def _complete(out: Path) -> bool:
    """A finished composite: recipe, adapter and merged weights all present and readable."""
    recipe = json.loads((out / RECIPE_FILE).read_text())
    from safetensors import safe_open

    with safe_open(str(out / "merged" / "base.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 24
    return recipe["output"]["merged"]["report"]["modules_merged"] == 24 and len(read_adapter(out).modules) == 24


def test_kill_9_during_compose_save_leaves_nothing_or_everything(tmp_path: Path) -> None:
    """A composite killed with SIGKILL at several points of its write: OUT is absent or complete, never partial;
    the next run for the same OUT removes the hidden temp folders of the killed ones."""
    script, base, out = tmp_path / "w.py", tmp_path / "base.safetensors", tmp_path / "out"
    script.write_text(_WORKER)
    subprocess.run([sys.executable, script, out, base, "make-base"], check=True, timeout=300)

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, script, out, base, "save"], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "READY"
        return p

    p = start()  # an uninterrupted run: how long the write takes here
    assert p.stdout is not None
    took = float(p.stdout.readline().split()[1])
    assert p.wait(timeout=300) == 0 and _complete(out)
    os.rename(out, tmp_path / "first")

    left: list[str] = []  # hidden temp folders of killed runs
    for frac in (0.1, 0.5, 0.9):
        p = start()
        time.sleep(took * frac)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        if out.exists():
            assert _complete(out), f"killed at {frac:.0%} of the write: {sorted(os.listdir(out))}"
            os.rename(out, tmp_path / f"done-{frac}")
        else:
            left += leftovers(tmp_path, "out")
            assert not any(n.startswith("out") for n in os.listdir(tmp_path) if n != "out")
    assert left, f"no kill landed inside the write (it took {took:.3f} s)"
    assert all(n.startswith(".out.tmp-") for n in left)  # hidden: never mistaken for an output

    p = start()
    assert p.wait(timeout=300) == 0 and _complete(out)
    assert leftovers(tmp_path, "out") == []  # the killed runs' temp folders are gone


def test_failed_merge_into_leaves_no_output(world: Path, tmp_path: Path) -> None:
    """--merge-into that fails (a base without the adapter's tensors) leaves no OUT at all."""
    bad_base = tmp_path / "badbase"
    bad_base.mkdir()
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(2, 2)}, bad_base / "model.safetensors")
    out = tmp_path / "out"
    code, stderr = cli("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out,
                       "--merge-into", bad_base)
    assert code == 2 and "other" not in one_error_line(stderr) and "not in the base weights" in stderr
    assert not out.exists() and leftovers(tmp_path, "out") == []


# --- item 8: never overwrite silently ------------------------------------------------------------------------

def test_compose_refuses_a_non_empty_folder_unless_overwrite(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    code, stderr = cli("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out)
    line = one_error_line(stderr)
    assert code == 2 and str(out) in line and "--overwrite" in line
    assert tree(out) == {"adapter_config.json": b'{"mine": true}', "notes.txt": b"keep me"}

    code, stderr = cli("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out,
                       "--overwrite")
    assert code == 0, stderr
    assert not (out / "notes.txt").exists() and (out / RECIPE_FILE).exists()
    assert len(read_adapter(out).modules) == 4
    assert leftovers(tmp_path, "mine") == []


def test_python_save_and_export_refuse_existing_outputs(world: Path, tmp_path: Path) -> None:
    with Bank.open(world / "bank") as bank:
        comp = compose(bank, Prototype.load(world / "target.npy"), k=2, strategy="avg")
        out = comp.save(tmp_path / "c")
        before = tree(out)
        with pytest.raises(OutputExistsError, match="overwrite=True"):
            comp.save(out)
        with pytest.raises(FileExistsError):  # the built-in parent, for callers that do not know adapterbank
            comp.save(out)
        assert tree(out) == before
        comp3 = compose(bank, Prototype.load(world / "target.npy"), k=3, strategy="avg")
        comp3.save(out, overwrite=True)
        assert len(json.loads((out / RECIPE_FILE).read_text())["retrieval"]["ids"]) == 3

        folder = bank.export("a0", tmp_path / "e")
        with pytest.raises(OutputExistsError, match="overwrite=True"):
            bank.export("a0", folder)
        f = tmp_path / "e.safetensors"
        f.write_bytes(b"user data")
        for fmt in (None, "diffusers"):  # bit for bit, and converted
            with pytest.raises(OutputExistsError, match="overwrite=True"):
                bank.export("style", f, format=fmt)
            assert f.read_bytes() == b"user data"
        assert bank.export("style", f, format="diffusers", overwrite=True) == f
        assert len(read_adapter(f).modules) == 1
        assert bank.export("style", f, overwrite=True) == f
        assert f.read_bytes() == (world / "src" / "style.safetensors").read_bytes()
        assert bank.export("a1", folder, overwrite=True) == folder
        assert tree(folder) == adapter_files(world / "src" / "a1")  # bit for bit, the old a0 files gone


def test_export_cli_refuses_then_overwrites(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"mine")
    code, stderr = cli("export", world / "bank", "a0", "-o", out)
    line = one_error_line(stderr)
    assert code == 2 and str(out) in line and "--overwrite" in line
    assert (out / "adapter_model.safetensors").read_bytes() == b"mine"
    code, stderr = cli("export", world / "bank", "a0", "-o", out, "--overwrite")
    assert code == 0, stderr
    assert tree(out) == adapter_files(world / "src" / "a0")


def test_overwrite_keeps_the_old_content_when_the_new_write_fails(world: Path, tmp_path: Path) -> None:
    """--overwrite with a write that fails (ulimit -f: the merged model is too large): the old OUT is intact."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"old": true}')
    res = cli_subprocess("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out,
                         "--merge-into", world / "base", "--overwrite", fsize=FSIZE)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and str(out) in line and "File too large" in line and "ulimit -f" in line
    assert ".tmp-" not in line  # the temp folder is not what the user gave
    assert tree(out) == {"adapter_config.json": b'{"old": true}'}
    assert leftovers(tmp_path, "old") == []


# --- item 9: operating-system errors -------------------------------------------------------------------------

def test_output_path_is_an_existing_file(world: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("mine")
    for extra in ((), ("--overwrite",)):
        code, stderr = cli("compose", world / "bank", "--prototype", world / "target.npy", "-o", f, *extra)
        line = one_error_line(stderr)
        assert code == 2 and str(f) in line and "is an existing file" in line
    assert f.read_text() == "mine"


def test_output_path_under_a_regular_file(world: Path, tmp_path: Path) -> None:
    """ENOTDIR (what a read-only or missing folder is to root): a clear error for compose, export and the API."""
    f = tmp_path / "file"
    f.write_text("mine")
    code, stderr = cli("compose", world / "bank", "--prototype", world / "target.npy", "-o", f / "out")
    line = one_error_line(stderr)
    assert code == 2 and f"Cannot write the composite {f / 'out'}" in line and "Not a directory" in line
    code, stderr = cli("export", world / "bank", "style", "-o", f / "sub" / "x.safetensors", "--format", "diffusers")
    line = one_error_line(stderr)
    assert code == 2 and str(f / "sub" / "x.safetensors") in line and "Not a directory" in line
    with Bank.open(world / "bank") as bank, pytest.raises(OutputWriteError) as ei:
        bank.export("a0", f / "e")
    assert isinstance(ei.value, OSError) and ei.value.filename and ei.value.errno == 20
    with pytest.raises(OutputWriteError, match="no bank was created"):
        Bank.init(f / "bank")
    assert f.read_text() == "mine"


def test_disk_full_during_compose(world: Path, tmp_path: Path) -> None:
    """``ulimit -f`` stops the composite's write: exit 2, one line naming OUT, no OUT, no temp folder."""
    out = tmp_path / "c"
    res = cli_subprocess("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out,
                         fsize=FSIZE)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and f"Cannot write the composite {out}" in line and "File too large" in line
    assert not out.exists() and leftovers(tmp_path, "c") == []
    res = cli_subprocess("compose", world / "bank", "--prototype", world / "target.npy", "-k", "2", "-o", out,
                         fsize=36 * 1024)  # not even room to read one adapter: its scratch copy fails
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and "temporary copy of adapter" in line and "TMPDIR" in line and not out.exists()


def test_bank_write_fails_during_add(world: Path, tmp_path: Path, peft_adapter: Any, tiny_llama: Any) -> None:
    """A bank that cannot take the adapter's bytes (ulimit -f): the error names the bank, not its staging area
    or the catalog; the bank is unchanged and `verify` finds nothing wrong with it."""
    import shutil

    bank = tmp_path / "bank"
    shutil.copytree(world / "bank", bank)
    src = peft_adapter(tiny_llama(), tmp_path / "new", seed=7, r=96)  # 86 KB
    res = cli_subprocess("add", bank, src, "--id", "new", fsize=FSIZE)
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and f"Cannot write to the bank {bank}" in line and "nothing was added" in line
    assert "catalog" not in line and str(bank / "tmp") not in line
    with Bank.open(bank) as b:
        assert "new" not in b and b.verify().ok and b.verify().problems == []
    res = cli_subprocess("verify", bank)
    assert res.returncode == 0 and "ok" in res.stdout


def test_cli_last_resort_for_unworded_os_errors(world: Path, tmp_path: Path) -> None:
    """An OSError no library code worded (a --samples path that is a folder of nothing readable) is one line."""
    code, stderr = cli("add", world / "bank", tmp_path / "missing-adapter")
    line = one_error_line(stderr)
    assert code == 2 and str(tmp_path / "missing-adapter") in line


# --- item 12: messages name what the user gave ---------------------------------------------------------------

@pytest.fixture
def corrupt(world: Path, tmp_path: Path) -> Path:
    """A PEFT adapter folder whose weights file is not safetensors."""
    import shutil

    d = tmp_path / "user-adapter"
    shutil.copytree(world / "src" / "a0", d)
    (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return d


def test_add_errors_name_the_users_file_python(world: Path, corrupt: Path) -> None:
    with Bank.open(world / "bank") as bank, pytest.raises(FormatError) as ei:
        bank.add(corrupt, id="bad")
    msg = str(ei.value)
    assert str(corrupt) in msg and str(world / "bank" / "tmp") not in msg and "/files/" not in msg


def test_add_errors_name_the_users_file_cli(world: Path, corrupt: Path, tmp_path: Path) -> None:
    code, stderr = cli("add", world / "bank", corrupt, "--id", "bad")
    line = one_error_line(stderr)
    assert code == 2 and str(corrupt) in line and str(world / "bank" / "tmp") not in line
    single = tmp_path / "style.safetensors"
    single.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    code, stderr = cli("add", world / "bank", single, "--format", "kohya", "--id", "style2")
    line = one_error_line(stderr)
    assert code == 2 and str(single) in line and str(world / "bank" / "tmp") not in line


def test_conflict_message_names_the_cli_flag(world: Path) -> None:
    code, stderr = cli("add", world / "bank", world / "src" / "a0", "--id", "a0")
    line = one_error_line(stderr)
    assert code == 2 and "--replace" in line
