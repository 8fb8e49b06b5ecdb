"""Streamed inputs: JSONL / CSV / TSV / Parquet / TXT files, image folders, lists, iterables, descriptions."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterbank.errors import FormatError, ParameterError
from adapterbank.prototypes import describe_source, iter_batches, iter_items

ROWS = [{"id": i, "prompt": f"prompt number {i}", "label": i % 3} for i in range(11)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.fixture(params=["jsonl", "csv", "tsv", "parquet"])
def data_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    kind = request.param
    p = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        return write_jsonl(p, ROWS)
    if kind in ("csv", "tsv"):
        return write_csv(p, ROWS, "\t" if kind == "tsv" else ",")
    return write_parquet(p, ROWS)


def test_files_pick_the_text_column_and_batch(data_file: Path) -> None:
    batches = list(iter_batches(data_file, 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [x for b in batches for x in b] == [r["prompt"] for r in ROWS]
    assert list(iter_batches(data_file, 5, limit=7)) == [[r["prompt"] for r in ROWS[:5]],
                                                        [r["prompt"] for r in ROWS[5:7]]]
    assert list(iter_batches(data_file, 3, limit=0)) == []
    labels = [x for b in iter_batches(data_file, 100, column="label") for x in b]
    assert [str(x) for x in labels] == [str(r["label"]) for r in ROWS]  # CSV gives strings


def test_missing_column_names_file_and_columns(data_file: Path) -> None:
    with pytest.raises(FormatError) as e:
        list(iter_batches(data_file, 4, column="body"))
    msg = str(e.value)
    assert str(data_file) in msg and "'body'" in msg and "'prompt'" in msg and "'label'" in msg


def test_no_text_column_lists_the_expected_names(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}])
    with pytest.raises(FormatError, match=r"no text column; expected one of \['text', 'prompt'.*columns \['body'\]"):
        list(iter_batches(p, 2))


def test_jsonl_details(tmp_path: Path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text('"plain string line"\n\n{"text": "obj", "prompt": "ignored"}\n')
    assert list(iter_items(p)) == ["plain string line", "obj"]  # "text" wins over "prompt"
    p.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(FormatError, match=r"s.jsonl, line 2: not valid JSON"):
        list(iter_items(p))
    p.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(FormatError, match=r"line 2: no column 'text'. It has columns \['other'\]"):
        list(iter_items(p))
    p.write_text('{"text": null}\n')
    with pytest.raises(FormatError, match="column 'text' is empty"):
        list(iter_items(p))


def test_streaming_reads_only_what_it_needs(tmp_path: Path) -> None:
    def endless() -> Iterator[str]:
        i = 0
        while True:
            yield f"item {i}"
            i += 1

    assert list(iter_batches(endless(), 3, limit=5)) == [["item 0", "item 1", "item 2"], ["item 3", "item 4"]]
    p = tmp_path / "big.jsonl"
    with open(p, "w") as fh:
        fh.write(json.dumps({"text": "first"}) + "\n")
        fh.write("this line is broken json and must never be read\n")
    assert list(iter_batches(p, 10, limit=1)) == [["first"]]


def test_parquet_streams_across_row_groups(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}"} for i in range(50)]
    p = write_parquet(tmp_path / "many.parquet", rows, row_group_size=7)
    got = list(iter_batches(p, 16))
    assert [len(b) for b in got] == [16, 16, 16, 2]
    assert [x for b in got for x in b] == [r["text"] for r in rows]


def test_txt_lists_records_and_descriptions(tmp_path: Path) -> None:
    t = tmp_path / "lines.txt"
    t.write_text("one\n\ntwo\nthree\n")
    assert list(iter_items(t)) == ["one", "two", "three"]
    assert list(iter_items([{"question": "q1"}, {"question": "q2"}])) == ["q1", "q2"]
    assert list(iter_items([{"a": 1, "b": 2}], column="b")) == [2]
    assert list(iter_items("summarise French legal contracts")) == ["summarise French legal contracts"]
    assert list(iter_items("   ")) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_items(str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError):
        list(iter_items(tmp_path / "missing_dir"))
    with pytest.raises(FormatError, match="unknown input file type '.xyz'"):
        (tmp_path / "f.xyz").write_text("x")
        list(iter_items(tmp_path / "f.xyz"))
    with pytest.raises(FormatError, match="Cannot read samples from a int"):
        list(iter_items(5))


def test_image_folder_sorted_rgb(image_folder: Path) -> None:
    batches = list(iter_batches(image_folder, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    ims = [x for b in batches for x in b]
    assert all(im.mode == "RGB" for im in ims)
    assert [im.size for im in ims] == [(26, 23), (30, 29), (24, 20), (32, 32), (28, 26)]  # a, b, c, d, e


def test_bad_parameters_and_bad_image(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="'batch_size' parameter of iter_batches must be an int ≥ 1. Got 0"):
        list(iter_batches(["a"], 0))
    with pytest.raises(ParameterError, match="'limit' parameter"):
        list(iter_batches(["a"], 1, limit=-1))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FormatError, match="broken.png: not a readable image"):
        list(iter_items(tmp_path))


def test_describe_source(tmp_path: Path, image_folder: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert describe_source(p, "prompt") == f"{p} [column=prompt]"
    assert describe_source(image_folder) == f"{image_folder} (images)"
    assert describe_source("x " * 100).endswith("...") and len(describe_source("x " * 100)) < 140


# --- files that are not what they claim -------------------------------------------------------

BAD_UTF8 = {"jsonl": (b'{"text": "fine"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n', 3),
            "csv": (b"text,label\nfine,1\ncaf\xe9,2\n", 3),
            "txt": (b"fine\n\nbad \xff byte\n", 3)}


@pytest.mark.parametrize("suffix", sorted(BAD_UTF8))
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    data, line = BAD_UTF8[suffix]
    p = tmp_path / f"latin1.{suffix}"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=rf"^{p}, line {line}: not valid UTF-8"):
        list(iter_items(p))


def test_a_utf8_bom_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext\r\ncaf\xc3\xa9\r\n")
    assert list(iter_items(tmp_path / "bom.jsonl")) == list(iter_items(tmp_path / "bom.csv")) == ["café"]


MIB = 1 << 20


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "txt"])
def test_a_line_over_the_cap_is_refused_with_its_number(tmp_path: Path, suffix: str) -> None:
    big = "word " * (3 * MIB // 5)  # a 3 MiB text on line 2 of the data
    p = tmp_path / f"big.{suffix}"
    rows = ["short one", big, "short two"]
    if suffix == "jsonl":
        write_jsonl(p, [{"text": t} for t in rows])
    elif suffix == "csv":
        write_csv(p, [{"text": t} for t in rows])
    else:
        p.write_text("".join(t + "\n" for t in rows))
    line = 3 if suffix == "csv" else 2  # after the CSV header
    it = iter_items(p)
    assert next(it) == "short one"  # streamed: what comes before the long line is read
    with pytest.raises(FormatError, match=rf"^{p}, line {line}: longer than {MIB} bytes") as ei:
        next(it)
    assert "max_line_bytes" in str(ei.value) and "ADAPTERBANK_MAX_LINE_BYTES" in str(ei.value)
    got = list(iter_items(p, max_line_bytes=4 * MIB))  # the cap is overridable
    assert [len(x) for x in got] == [len(t) for t in rows]
    with pytest.raises(FormatError, match=rf"line {line}: longer than 1000 bytes"):
        list(iter_items(p, max_line_bytes=1000))


def test_the_cap_counts_bytes_not_the_end_of_line(tmp_path: Path) -> None:
    p = tmp_path / "edge.txt"
    p.write_bytes(b"x" * 100 + b"\r\n" + "é".encode() * 50 + b"\n" + b"y" * 101 + b"\n")
    it = iter_items(p, max_line_bytes=100)
    assert len(next(it)) == 100 and next(it) == "é" * 50  # exactly 100 bytes each
    with pytest.raises(FormatError, match=r"line 3: longer than 100 bytes"):
        next(it)


def test_the_cap_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 500}])
    monkeypatch.setenv("ADAPTERBANK_MAX_LINE_BYTES", "100")
    with pytest.raises(FormatError, match=r"line 1: longer than 100 bytes"):
        list(iter_items(p))
    assert len(list(iter_items(p, max_line_bytes=1000))) == 1  # the argument wins
    monkeypatch.setenv("ADAPTERBANK_MAX_LINE_BYTES", "lots")
    with pytest.raises(ParameterError, match="ADAPTERBANK_MAX_LINE_BYTES.*'lots'"):
        list(iter_items(p))
    with pytest.raises(ParameterError, match="max_line_bytes"):
        list(iter_items(p, max_line_bytes=0))


def test_a_parquet_cell_over_the_cap_names_its_row(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "d.parquet", [{"text": "a"}, {"text": "b" * 2000}])
    with pytest.raises(FormatError, match=rf"^{p}, row 1: longer than 1000 bytes"):
        list(iter_items(p, max_line_bytes=1000))


def test_a_huge_line_is_never_read_into_memory(tmp_path: Path) -> None:
    """A 16 MiB line under a 256 KiB cap: the peak RSS of a child process grows by far less than the line."""
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as fh:
        fh.write(b'{"text": "ok"}\n{"text": "')
        for _ in range(16):
            fh.write(b"z" * MIB)
        fh.write(b'"}\n')
    code = textwrap.dedent(f"""
        import resource
        from adapterbank.errors import FormatError
        from adapterbank.prototypes.inputs import iter_items
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            list(iter_items({str(p)!r}, max_line_bytes=256 * 1024))
        except FormatError as e:
            print(e)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith(f"{p}, line 2: longer than 262144 bytes")
    assert int(out[1]) < 6, f"peak RSS grew by {out[1]} MiB while refusing a 16 MiB line"


def test_a_parquet_cell_is_capped_in_bytes_not_characters(tmp_path: Path) -> None:
    p = write_parquet(tmp_path / "d.parquet", [{"text": "é" * 600}])  # 600 characters, 1200 bytes
    with pytest.raises(FormatError, match=rf"^{p}, row 0: longer than 1000 bytes"):
        list(iter_items(p, max_line_bytes=1000))
