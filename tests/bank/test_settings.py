"""Bank.set_setting / get_setting: the catalog's settings table (JSON values, one write transaction that bumps
the version), seen by other handles and processes, and created on first write in a catalog without it."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapterbank.bank import Bank
from adapterbank.errors import FormatError, ParameterError


def test_settings_round_trip_and_bump_the_version(tmp_path: Path) -> None:
    a = Bank.init(tmp_path / "bank")
    b = Bank.open(tmp_path / "bank")
    v0 = a.version
    assert a.get_setting("compose.auto") is None and a.get_setting("compose.auto", 7) == 7
    a.set_setting("compose.auto", {"strategy": "sim", "params": {"tau_rel": 0.5}, "k": 3})
    assert a.version == v0 + 1 and b.version == v0 + 1
    assert b.get_setting("compose.auto") == {"strategy": "sim", "params": {"tau_rel": 0.5}, "k": 3}
    a.set_setting("compose.auto", [1, "two"])  # replaces
    code = f"from adapterbank.bank import Bank; import json; print(json.dumps(Bank.open({str(a.root)!r}).get_setting('compose.auto')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [1, "two"]
    a.set_setting("compose.auto", None)
    assert b.get_setting("compose.auto") is None and a.version == v0 + 3
    a.close()
    b.close()


def test_settings_refuse_bad_keys_and_non_json(tmp_path: Path) -> None:
    bank = Bank.init(tmp_path / "bank")
    v0 = bank.version
    for key in ("", "  ", 3, "x" * 1001):
        with pytest.raises(ParameterError, match="'key'"):
            bank.set_setting(key, 1)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="JSON"):
        bank.set_setting("x", {"v": math.inf})
    with pytest.raises(FormatError, match="JSON"):
        bank.set_setting("x", object())
    assert bank.version == v0 and bank.get_setting("x") is None  # nothing was written
    bank.close()


def test_settings_table_created_on_first_write_in_an_older_catalog(tmp_path: Path) -> None:
    Bank.init(tmp_path / "bank").close()
    with sqlite3.connect(tmp_path / "bank" / "catalog.sqlite") as c:  # a catalog from before the settings table
        c.execute("DROP TABLE settings")
    bank = Bank.open(tmp_path / "bank")
    assert bank.get_setting("compose.auto") is None  # reading does not need (or create) the table
    with sqlite3.connect(tmp_path / "bank" / "catalog.sqlite") as c:
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings'").fetchone() is None
    bank.set_setting("compose.auto", {"strategy": "avg"})
    bank.close()
    with Bank.open(tmp_path / "bank") as again:
        assert again.get_setting("compose.auto") == {"strategy": "avg"} and again.verify().ok


def test_encoders_live_in_the_catalog_one_setting_per_space(tmp_path: Path) -> None:
    a = Bank.init(tmp_path / "bank")
    b = Bank.open(tmp_path / "bank")
    assert a.encoders() == {}
    a.remember_encoder("enc-x@r1|mean|l2|8", "default")
    b.remember_encoder("enc-y@r1|mean|l2|4", "mod:fn")  # another handle, another space: neither is lost
    v = a.version
    a.remember_encoder("enc-x@r1|mean|l2|8", "default")  # unchanged: no write
    assert a.version == v
    assert a.encoders() == b.encoders() == {"enc-x@r1|mean|l2|8": "default", "enc-y@r1|mean|l2|4": "mod:fn"}
    assert not (tmp_path / "bank" / "encoders.json").exists()
    with pytest.raises(ParameterError, match="non-empty string"):
        a.remember_encoder("k", "")


def test_legacy_encoders_json_is_read_and_the_catalog_wins(tmp_path: Path) -> None:
    bank = Bank.init(tmp_path / "bank")
    (tmp_path / "bank" / "encoders.json").write_text(json.dumps({"old|mean|l2|8": "/models/old", "x|mean|l2|8": "a"}))
    bank.remember_encoder("x|mean|l2|8", "b")
    assert bank.encoders() == {"old|mean|l2|8": "/models/old", "x|mean|l2|8": "b"}
    (tmp_path / "bank" / "encoders.json").write_text("{not json")
    with pytest.raises(Exception, match="encoders.json: cannot read the recorded encoders"):
        bank.encoders()
