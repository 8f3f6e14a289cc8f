"""Reading rows from local files and dataset directories: values, `where`, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cli.data.sources import Row, load_rows, looks_local
from rlhf_cli.errors import UserError


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


PC1 = {"prompt": "p1", "completion": "c1"}
PC2 = {"prompt": "p2", "completion": "c2"}
PC3 = {"prompt": "p3", "completion": "c3"}


# ---------------------------------------------------------------- JSON Lines


def test_jsonl_rows_and_true_line_numbers_with_blank_lines_skipped(tmp_path):
    text = json.dumps(PC1) + "\n\n   \n" + json.dumps(PC2) + "\n\n" + json.dumps(PC3)  # no final newline
    spec = _write(tmp_path / "d.jsonl", text)
    rows = load_rows(spec)
    assert rows == [Row(PC1, f"{spec}:1"), Row(PC2, f"{spec}:4"), Row(PC3, f"{spec}:6")]


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(PC1) + "\r\n" + json.dumps(PC2) + "\r\n").encode())
    rows = load_rows(str(path))
    assert [r.data for r in rows] == [PC1, PC2]
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]


def test_jsonl_keeps_unicode_and_nested_values(tmp_path):
    obj = {"messages": [{"role": "user", "content": "héllo ✓ 你好"}, {"role": "assistant", "content": "x"}], "n": 3}
    spec = _write(tmp_path / "d.jsonl", _jsonl(obj))
    assert load_rows(spec)[0].data == obj


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    spec = _write(tmp_path / "bad.jsonl", json.dumps(PC1) + "\n" + json.dumps(PC2) + "\n{\"prompt\": \"x\",\n" + json.dumps(PC3) + "\n")
    with pytest.raises(UserError) as info:
        load_rows(spec)
    message = str(info.value)
    assert message.startswith(f"{spec}:3: ")
    assert "malformed JSON" in message


def test_jsonl_malformed_line_number_counts_blank_lines(tmp_path):
    spec = _write(tmp_path / "bad.jsonl", json.dumps(PC1) + "\n\n\nnot json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:4: malformed JSON"):
        load_rows(spec)


def test_jsonl_non_utf8_bytes_name_line_2(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PC1).encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "c"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert "UTF-8" in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_jsonl_empty_file_has_no_rows(tmp_path, text):
    spec = _write(tmp_path / "empty.jsonl", text)
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}: ")
    assert "no rows" in str(info.value)


@pytest.mark.parametrize(("value", "kind"), [([1, 2], "list"), ('"text"', "str"), ("42", "int"), ("null", "NoneType")])
def test_jsonl_value_not_an_object(tmp_path, value, kind):
    spec = _write(tmp_path / "d.jsonl", json.dumps(PC1) + "\n" + (value if isinstance(value, str) else json.dumps(value)) + "\n")
    with pytest.raises(UserError) as info:
        load_rows(spec)
    message = str(info.value)
    assert message.startswith(f"{spec}:2: ")
    assert "expected a JSON object" in message and kind in message


# ---------------------------------------------------------------- JSON


def test_json_list_of_objects_with_lines(tmp_path):
    text = "[\n  " + json.dumps(PC1) + ",\n\n  " + json.dumps(PC2) + ",\n  {\n    \"prompt\": \"p3\",\n    \"completion\": \"c3\"\n  }\n]\n"
    spec = _write(tmp_path / "d.json", text)
    rows = load_rows(spec)
    assert [r.data for r in rows] == [PC1, PC2, PC3]
    assert [r.where for r in rows] == [f"{spec}:2", f"{spec}:4", f"{spec}:5"]


def test_json_list_lines_ignore_braces_inside_strings_and_nested_objects(tmp_path):
    first = {"messages": [{"role": "user", "content": "{[not a row]}"}, {"role": "assistant", "content": "}}"}]}
    text = "[\n" + json.dumps(first) + ",\n" + json.dumps(PC2) + "\n]"
    spec = _write(tmp_path / "d.json", text)
    rows = load_rows(spec)
    assert [r.data for r in rows] == [first, PC2]
    assert [r.where for r in rows] == [f"{spec}:2", f"{spec}:3"]


def test_json_list_lines_with_escaped_quotes(tmp_path):
    first = {"prompt": 'say "hi', "completion": "y"}
    text = "[\n" + json.dumps(first) + ",\n" + json.dumps(PC2) + ",\n" + json.dumps(PC3) + "\n]\n"
    spec = _write(tmp_path / "d.json", text)
    rows = load_rows(spec)
    assert [r.data for r in rows] == [first, PC2, PC3]
    assert [r.where for r in rows] == [f"{spec}:2", f"{spec}:3", f"{spec}:4"]


def test_json_single_object_is_one_row(tmp_path):
    spec = _write(tmp_path / "one.json", json.dumps(PC1, indent=2))
    rows = load_rows(spec)
    assert [r.data for r in rows] == [PC1]
    assert rows[0].where.startswith(f"{spec}:")


def test_json_single_object_where_is_its_line(tmp_path):
    spec = _write(tmp_path / "one.json", json.dumps(PC1) + "\n")
    assert load_rows(spec)[0].where == f"{spec}:1"


def test_json_file_with_json_lines_content(tmp_path):
    spec = _write(tmp_path / "lines.json", json.dumps(PC1) + "\n\n" + json.dumps(PC2) + "\n")
    rows = load_rows(spec)
    assert rows == [Row(PC1, f"{spec}:1"), Row(PC2, f"{spec}:3")]


def test_json_file_with_json_lines_content_reports_bad_line(tmp_path):
    spec = _write(tmp_path / "lines.json", json.dumps(PC1) + "\n" + json.dumps(PC2) + "\n{oops\n")
    with pytest.raises(UserError, match=r"lines\.json:3: malformed JSON"):
        load_rows(spec)


def test_json_malformed_names_line(tmp_path):
    spec = _write(tmp_path / "bad.json", "[\n" + json.dumps(PC1) + ",\n" + '{"prompt": "p2" "completion": "c2"}\n]\n')
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}:3: malformed JSON")


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_json_empty_file_has_no_rows(tmp_path, text):
    spec = _write(tmp_path / "empty.json", text)
    with pytest.raises(UserError, match="no rows"):
        load_rows(spec)


def test_json_empty_list_has_no_rows(tmp_path):
    spec = _write(tmp_path / "empty.json", "[]\n")
    with pytest.raises(UserError, match="no rows"):
        load_rows(spec)


def test_json_top_level_scalar_is_refused(tmp_path):
    spec = _write(tmp_path / "s.json", '"just a string"\n')
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}:1: ")
    assert "list of objects" in str(info.value) and "str" in str(info.value)


def test_json_list_item_not_an_object(tmp_path):
    spec = _write(tmp_path / "d.json", "[\n" + json.dumps(PC1) + ",\n[1, 2]\n]\n")
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}:")
    assert "expected a JSON object, found list" in str(info.value)


def test_json_non_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"[\n" + b'{"prompt": "\xff", "completion": "c"}\n]')
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert "UTF-8" in str(info.value)


# ---------------------------------------------------------------- CSV


def test_csv_rows_with_header_and_lines(tmp_path):
    spec = _write(tmp_path / "d.csv", 'prompt,completion\np1,c1\n"p, 2","c ""2"""\n')
    rows = load_rows(spec)
    assert rows == [
        Row({"prompt": "p1", "completion": "c1"}, f"{spec}:2"),
        Row({"prompt": "p, 2", "completion": 'c "2"'}, f"{spec}:3"),
    ]


def test_csv_non_ascii(tmp_path):
    spec = _write(tmp_path / "d.csv", "prompt,completion\nhéllo,wörld ✓\n")
    assert load_rows(spec)[0].data == {"prompt": "héllo", "completion": "wörld ✓"}


def test_csv_too_many_fields_names_line(tmp_path):
    spec = _write(tmp_path / "d.csv", "prompt,completion\np1,c1\np2,c2,extra\n")
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}:3: ")
    assert "more fields than the header" in str(info.value)


def test_csv_non_utf8_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\ncaf\xe9,c\n")
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize("text", ["", "prompt,completion\n"])
def test_csv_without_data_rows_has_no_rows(tmp_path, text):
    spec = _write(tmp_path / "d.csv", text)
    with pytest.raises(UserError, match="no rows"):
        load_rows(spec)


# ---------------------------------------------------------------- Parquet and dataset directories


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    records = [PC1, PC2, {"prompt": "p3", "completion": "c3"}]
    pq.write_table(pa.Table.from_pylist(records), path)
    rows = load_rows(str(path))
    assert [r.data for r in rows] == records
    assert [r.where for r in rows] == [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3"]


def test_parquet_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    pq.write_table(pa.Table.from_pylist([record]), path)
    assert load_rows(str(path))[0].data == record


def test_parquet_unreadable_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(UserError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert "Parquet" in str(info.value)


def test_dataset_directory_via_datasets(tmp_path):
    directory = tmp_path / "ds"
    directory.mkdir()
    _write(directory / "train.jsonl", _jsonl(PC1, PC2))
    rows = load_rows(str(directory), split="train")
    assert [r.data for r in rows] == [PC1, PC2]
    assert [r.where for r in rows] == [f"{directory}[train]#1", f"{directory}[train]#2"]
    with pytest.raises(UserError) as info:
        load_rows(str(directory), split="nope")
    assert str(info.value).startswith(f"{directory}: ")


# ---------------------------------------------------------------- paths, specs, looks_local


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.csv", "x.parquet", "./x", "sub/dir/x"])
def test_missing_local_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_rows(name)
    assert str(info.value) == f"{name}: no such file"


def test_unsupported_file_type(tmp_path):
    spec = _write(tmp_path / "d.txt", "hello\n")
    with pytest.raises(UserError) as info:
        load_rows(spec)
    assert str(info.value).startswith(f"{spec}: unsupported file type '.txt'")


def test_uppercase_suffix_is_read(tmp_path):
    spec = _write(tmp_path / "D.JSONL", _jsonl(PC1))
    assert load_rows(spec) == [Row(PC1, f"{spec}:1")]


def test_builtin_spec():
    rows = load_rows("builtin:arith_eval")
    assert rows[0].where == "builtin:arith_eval#1"
    assert {"prompt", "completion", "answer"} <= set(rows[0].data)
    with pytest.raises(UserError, match="builtin:nope: no such built-in"):
        load_rows("builtin:nope")


@pytest.mark.parametrize(
    ("spec", "local"),
    [
        ("data.jsonl", True),
        ("data.json", True),
        ("data.csv", True),
        ("data.parquet", True),
        ("./data", True),
        ("../data", True),
        ("/abs/data", True),
        ("~/data", True),
        ("a/b/c", True),
        ("gsm8k", False),
        ("openai/gsm8k", False),
        ("HuggingFaceH4/ultrachat_200k", False),
    ],
)
def test_looks_local(spec, local):
    assert looks_local(spec) is local


def test_looks_local_uppercase_suffix():
    assert looks_local("DATA.JSONL")
