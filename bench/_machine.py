"""Shared by the benchmark scripts: what they record about the machine, and their logging set-up."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, Python, CPU model, core count, torch version and threads, load average, plus ``extra``."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, **extra}


def quiet_logging(*noisy: str) -> None:
    """INFO logging with timestamps for the script; WARNING for ``noisy`` libraries and adapterbank."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "urllib3", "transformers", "peft", "adapterbank", *noisy):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_test_servers() -> Any:
    """The test suite's helpers (tests/bank/servers.py: real PostgreSQL / S3 servers, ``make_entry``), loaded once
    under the module name the tests use, so a benchmark builds catalogs the way the tests do."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "adapterbank_test_servers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "tests" / "bank" / "servers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
