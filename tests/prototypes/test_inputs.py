"""Streamed inputs: JSONL / CSV / TSV / Parquet / TXT files, image folders, lists, iterables, descriptions."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterbank.errors import EncoderError, FormatError
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
    with pytest.raises(EncoderError, match="'batch_size' parameter of iter_batches must be a positive int. Got 0"):
        list(iter_batches(["a"], 0))
    with pytest.raises(EncoderError, match="'limit' parameter"):
        list(iter_batches(["a"], 1, limit=-1))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FormatError, match="broken.png: not a readable image"):
        list(iter_items(tmp_path))


def test_describe_source(tmp_path: Path, image_folder: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert describe_source(p, "prompt") == f"{p} [column=prompt]"
    assert describe_source(image_folder) == f"{image_folder} (images)"
    assert describe_source("x " * 100).endswith("...") and len(describe_source("x " * 100)) < 140
