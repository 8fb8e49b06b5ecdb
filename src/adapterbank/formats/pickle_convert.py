"""Opt-in conversion of legacy pickle checkpoints (``.bin``, ``.pt``, ``.ckpt``, ...) to safetensors.

Pickle scanners miss crafted payloads, so the file is never unpickled in this process. A child Python
(``sys.executable -I``, no shell, empty working directory, minimal environment, time limit) runs
``torch.load(path, weights_only=True, map_location="cpu")`` — PyTorch's restricted unpickler, which
refuses any global that is not a tensor/storage type — checks that the result is a flat ``{str: Tensor}``
dict (or ``{"state_dict": {...}}``) and writes safetensors. There is no fallback to ``weights_only=False``:
any failure of the child, including a crash or a timeout, is reported as :class:`UnsafeFileError`
with the child's reason.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from adapterbank.errors import FormatError, UnsafeFileError
from adapterbank.formats.safetensors_io import check_header

logger = logging.getLogger(__name__)

__all__ = ["convert_pickle"]

_CHILD = r"""
import json, sys
def fail(msg):
    sys.stdout.write(json.dumps({"ok": False, "reason": msg}))
    sys.exit(3)
src, dst = sys.argv[1], sys.argv[2]
try:
    import torch
    obj = torch.load(src, weights_only=True, map_location="cpu")
except BaseException as e:
    fail(f"torch.load(weights_only=True) refused it: {type(e).__name__}: {e}"[:2000])
if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
if not isinstance(obj, dict):
    fail(f"expected a dict of tensors, got {type(obj).__name__}")
bad = [repr(k)[:80] for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
if bad:
    fail(f"expected a flat dict of str -> Tensor; offending keys: {', '.join(bad[:5])}")
from safetensors.torch import save_file
try:
    save_file({k: v.detach().clone().contiguous() for k, v in obj.items()}, dst, metadata={"format": "pt"})
except BaseException as e:
    fail(f"could not write safetensors: {type(e).__name__}: {e}"[:2000])
sys.stdout.write(json.dumps({"ok": True, "n": len(obj)}))
"""


def convert_pickle(path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, timeout: float = 600.0) -> Path:
    """Convert a pickle checkpoint to a safetensors file at ``out_path`` in a sandboxed subprocess.

    The child loads with ``weights_only=True`` only; the result must be a flat dict of tensors (or
    ``{"state_dict": {...}}``). The written file is checked with :func:`check_header` before it is moved
    into place. Raises :class:`UnsafeFileError` with the child's reason on any failure.

    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> torch.save({"w": torch.ones(2)}, d / "w.bin")
    >>> convert_pickle(d / "w.bin", d / "w.safetensors").name
    'w.safetensors'
    """
    src = Path(path).resolve()
    out = Path(out_path)
    if not src.is_file():
        raise FormatError(f"Cannot convert {src}: it is not a regular file.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    env = {k: os.environ[k] for k in ("PATH", "SYSTEMROOT", "LANG", "LC_ALL") if k in os.environ}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    try:
        with tempfile.TemporaryDirectory(prefix="adapterbank-convert-") as cwd:
            try:
                proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                    [sys.executable, "-I", "-c", _CHILD, str(src), str(tmp.resolve())],
                    cwd=cwd, env=env, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                raise UnsafeFileError(
                    f"Converting {src} with weights_only=True did not finish within {timeout:g} s; refused."
                ) from None
        reason = _child_reason(proc.stdout, proc.stderr)
        if proc.returncode != 0 or reason is not None:
            raise UnsafeFileError(
                f"Refused to convert {src}: {reason or f'the converter exited with status {proc.returncode}'}. "
                "It is never loaded with weights_only=False."
            )
        check_header(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("converted pickle checkpoint %s to %s (weights_only=True, subprocess)", src, out)
    return out


def _child_reason(stdout: bytes, stderr: bytes) -> str | None:
    text = stdout.decode("utf-8", "replace").strip()
    try:
        msg = json.loads(text.splitlines()[-1]) if text else None
    except ValueError:
        msg = None
    if isinstance(msg, dict) and msg.get("ok") is True:
        return None
    if isinstance(msg, dict) and isinstance(msg.get("reason"), str):
        return msg["reason"]
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    return " / ".join(tail) if tail else "the converter gave no answer"
