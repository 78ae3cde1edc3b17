"""mmalign.text.data.load_rows on local JSON files: read with the json module (no `datasets` import), layouts,
errors that name the file, row and line, and max_samples."""
import bz2
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmalign.testing import tiny_preference_rows, write_jsonl
from mmalign.text.data import Rows, load_rows, parse_preference_rows

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    elif path.suffix == ".bz2":
        path.write_bytes(bz2.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("name, layout", [
    ("d.jsonl", "lines"), ("d.jsonl.gz", "lines"), ("d.json.bz2", "lines"), ("d.json", "lines"),
    ("d.json", "list"), ("d.json", "pretty list"), ("d.json.gz", "pretty list"), ("d.json", "columns"),
    ("d.json", "pretty columns"),
])
def test_layouts_give_the_same_rows(tmp_path, name, layout):
    rows = tiny_preference_rows(5, kind="pairs")
    for i, row in enumerate(rows):
        row["bins"] = [i, i + 1]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    text = {"lines": _jsonl(rows), "list": json.dumps(rows), "pretty list": json.dumps(rows, indent=2),
            "columns": json.dumps(columns), "pretty columns": json.dumps(columns, indent=2)}[layout]
    loaded = load_rows(str(_write(tmp_path / name, text)))
    assert isinstance(loaded, Rows) and len(loaded) == 5
    assert list(loaded) == rows and loaded[3] == rows[3] and loaded[-1] == rows[-1]
    assert isinstance(loaded[1:3], Rows) and list(loaded[1:3]) == rows[1:3]
    examples, fmt = parse_preference_rows(loaded, source=name)
    assert fmt == "pairs" and [e.extra["bins"] for e in examples] == [[i, i + 1] for i in range(5)]


def test_rows_are_read_only_and_repr_names_the_source(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", tiny_preference_rows(2))
    rows = load_rows(str(path))
    with pytest.raises(TypeError):
        rows[0] = {}
    with pytest.raises(AttributeError):
        rows.append({})
    assert repr(rows) == f"Rows(2 rows from {path})"


def test_same_rows_as_datasets_for_uniform_files(tmp_path):
    """The rows the datasets json builder gave before, for the layouts it accepted (uniform schema)."""
    import datasets

    rows = tiny_preference_rows(4, kind="conversational") + tiny_preference_rows(2, kind="conversational", seed=3)
    for i, row in enumerate(rows):
        row["score"] = 0.5 * i
    for path in (_write(tmp_path / "c.jsonl.gz", _jsonl(rows)), _write(tmp_path / "c.json", json.dumps(rows, indent=1))):
        expected = datasets.load_dataset("json", data_files=str(path), split="train",
                                         cache_dir=str(tmp_path / "cache")).to_list()
        assert list(load_rows(str(path))) == expected


def test_one_object_is_one_row_unless_it_holds_columns(tmp_path):
    # a conversational row: lists of message objects are not columns
    row = tiny_preference_rows(1, kind="conversational")[0]
    assert list(load_rows(str(_write(tmp_path / "one.json", json.dumps(row, indent=2))))) == [row]
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert list(load_rows(str(_write(tmp_path / "pair.json", json.dumps(pair))))) == [pair]
    # in a .jsonl file every object is one row, even one holding lists
    groups = {"chosen": ["a", "b"], "rejected": ["c", "d"]}
    assert list(load_rows(str(_write(tmp_path / "g.jsonl", json.dumps(groups))))) == [groups]
    assert list(load_rows(str(_write(tmp_path / "g.json", json.dumps(groups))))) == [
        {"chosen": "a", "rejected": "c"}, {"chosen": "b", "rejected": "d"}]


def test_blank_lines_bom_and_mixed_columns_are_read_as_written(tmp_path):
    text = '\ufeff{"a": 1, "b": "x"}\n\n   \n{"a": 2.5}\n{"a": 3, "b": {"nested": [1]}}\n\n'
    rows = load_rows(str(_write(tmp_path / "m.jsonl", text)))
    # no schema unification: a missing key stays missing, an int stays an int, a column may change type
    assert list(rows) == [{"a": 1, "b": "x"}, {"a": 2.5}, {"a": 3, "b": {"nested": [1]}}]


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"prompt": "p"}\n{"prompt": "q",\n{"prompt": "r"}\n',
     r"bad.jsonl: row 2 \(line 2\): invalid JSON: Expecting property name"),
    ("blank.jsonl", '{"a": 1}\n\n{"a": 2\n', r"blank.jsonl: row 2 \(line 3\): invalid JSON: Expecting ',' delimiter"),
    ("first.jsonl", '{"a": 1\n{"a": 2}\n', r"first.jsonl: row 1 \(line 1\): invalid JSON: Expecting ',' delimiter"),
    ("first.json.gz", '{"a": 1\n{"a": 2}\n', r"first.json.gz: row 1 \(line 1\): invalid JSON"),
    ("scalar.jsonl", '{"a": 1}\n["a", 2]\n', r"scalar.jsonl: row 2 \(line 2\): expected a JSON object \(one row\), "
                                              r"got list \['a', 2\]"),
    ("strings.json", '["first prompt", "second prompt"]', r"strings.json: row 1: expected a JSON object \(one row\), "
                                                          r"got string 'first prompt'"),
    ("list.json", '[\n  {"a": 1},\n  {"a": 2,}\n]\n', r"list.json: invalid JSON at line 3, column 11: Expecting property"),
    ("pretty.json", '{\n  "prompt": "p",\n  "chosen": ,\n}', r"pretty.json: invalid JSON at line 3, column 13: "
                                                             r"Expecting value"),
    ("number.json", "42\n", r"number.json: row 1 \(line 1\): expected a JSON object \(one row\), got number 42"),
    ("empty.jsonl", "\n  \n", r"empty.jsonl: no rows \(the file is empty\)"),
    ("empty.json", "[]", r"empty.json: no rows"),
    ("columns.json", '{"prompt": ["p", "q"], "chosen": ["a"]}',
     r"columns.json: a top-level object of column lists needs equally long columns; got lengths \{'prompt': 2, 'chosen': 1\}"),
])
def test_malformed_files_name_file_row_line_and_problem(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=message):
        load_rows(str(path))


def test_unreadable_files(tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(_jsonl(tiny_preference_rows(50)).encode())[:60])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: could not be read: .*end-of-stream"):
        load_rows(str(truncated))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: row 1 \(line 1\), column \d+: .*not valid UTF-8"):
        load_rows(str(latin1))


def test_max_samples_keeps_the_first_rows_and_stops_reading(tmp_path):
    rows = tiny_preference_rows(6)
    # JSON Lines are read line by line: a broken line after the first max_samples rows is never reached
    path = _write(tmp_path / "p.jsonl", _jsonl(rows) + "{not json\n")
    assert list(load_rows(str(path), max_samples=4)) == rows[:4]
    assert list(load_rows(str(path), max_samples=6)) == rows
    with pytest.raises(ValueError, match=r"row 7 \(line 7\)"):
        load_rows(str(path), max_samples=7)
    documents = _write(tmp_path / "p.json", json.dumps(rows))
    assert list(load_rows(str(documents), max_samples=2)) == rows[:2]
    assert len(load_rows(str(documents), max_samples=100)) == 6


def test_a_local_jsonl_training_run_never_imports_datasets(tmp_path):
    """A whole tiny DPO run from a local JSONL (data, tokenizer, model, training, save) in a fresh interpreter, so
    that no other test's imports leak in: neither datasets nor pyarrow nor pandas gets imported."""
    data = write_jsonl(tmp_path / "pairs.jsonl", tiny_preference_rows(4, kind="pairs"))
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        from mmalign.testing import save_tiny_model_and_tokenizer
        from mmalign.text.recipes.preference import train
        model = save_tiny_model_and_tokenizer({str(tmp_path / "model")!r})
        train({{"model": {{"name_or_path": str(model)}}, "data": {{"train": {str(data)!r}}},
               "objective": {{"name": "dpo"}}, "output_dir": {str(tmp_path / "out")!r},
               "training": {{"batch_size": 2, "max_steps": 1, "num_threads": 1, "progress_bar": False}}}})
        print(json.dumps({{name: name in sys.modules for name in ("datasets", "pyarrow", "pandas")}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"datasets": False, "pyarrow": False, "pandas": False}
    assert (tmp_path / "out" / "final").is_dir()
