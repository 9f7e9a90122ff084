"""Reading rows: each source format, the location of every row, bad input with file:line errors,
the skip policy and its counts, max_samples, the demo sets and the seeded eval split."""

import json
import re

import pytest

from rlhf_ray.config.loader import ConfigError
from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.demo import DEMO_SETS, make_demo_rows
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sources import RowSet, load_rows, resolve_format, split_eval, split_rows


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def row(i):
    return json.dumps({"prompt": f"p{i}", "response": f"r{i}"})


# ---- JSONL ------------------------------------------------------------------------------------

def test_jsonl_rows_and_line_locations_skip_blank_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [row(0), "", "   ", row(3)])
    rows = load_rows(DataConfig(path=path))
    assert rows.rows == [{"prompt": "p0", "response": "r0"}, {"prompt": "p3", "response": "r3"}]
    # Blank lines 2 and 3 are skipped but still counted: the second row is on line 4.
    assert rows.locations == [f"{path}:1", f"{path}:4"]
    assert rows.skipped_malformed == 0 and rows.source == path


def test_jsonl_malformed_line_errors_with_its_line_number(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [row(0), row(1), '{"prompt": "p2", ', row(3)])
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + r": not valid JSON"):
        load_rows(DataConfig(path=path))


def test_jsonl_non_object_line_is_malformed(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [row(0), "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + r": expected a JSON object, got list"):
        load_rows(DataConfig(path=path))


def test_jsonl_skip_counts_malformed_rows(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [row(0), "not json", row(2), "7", row(4)])
    rows = load_rows(DataConfig(path=path, on_bad_row="skip"))
    assert [r["prompt"] for r in rows] == ["p0", "p2", "p4"]
    assert rows.locations == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert rows.skipped_malformed == 2
    assert rows.skip_reasons[0].startswith(f"{path}:2:") and rows.skip_reasons[1].startswith(f"{path}:4:")


def test_all_rows_skipped_is_an_error(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ["x", "y"])
    with pytest.raises(DataError, match=r"all 2 rows were skipped as malformed \(first: .*train.jsonl:1"):
        load_rows(DataConfig(path=path, on_bad_row="skip"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"data set {path} has no rows")):
        load_rows(DataConfig(path=str(path)))


@pytest.mark.parametrize("fmt", ["auto", "jsonl"])
def test_missing_file_names_the_path(tmp_path, fmt):
    path = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(DataError, match=re.escape(f"file '{path}' does not exist")):
        load_rows(DataConfig(path=path, format=fmt))


def test_max_samples_caps_and_stops_reading(tmp_path):
    # The bad line 3 is past the cap, so it is never parsed.
    path = write_lines(tmp_path / "train.jsonl", [row(0), row(1), "broken", row(3)])
    rows = load_rows(DataConfig(path=path, max_samples=2))
    assert [r["prompt"] for r in rows] == ["p0", "p1"]


# ---- JSON / parquet / datasets ------------------------------------------------------------------

def test_json_list_and_data_key_with_row_index_locations(tmp_path):
    items = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    for name, doc in [("list.json", items), ("wrapped.json", {"data": items})]:
        p = tmp_path / name
        p.write_text(json.dumps(doc))
        rows = load_rows(DataConfig(path=str(p)))
        assert rows.rows == items and rows.locations == [f"{p} row 0", f"{p} row 1"]


def test_json_bad_element_and_bad_document(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a"}, "oops"]))
    with pytest.raises(DataError, match=re.escape(f"{p} row 1") + r": expected a JSON object, got str"):
        load_rows(DataConfig(path=str(p)))
    p.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=re.escape(f"{p}:3") + r": not valid JSON"):
        load_rows(DataConfig(path=str(p)))
    p.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"expected a JSON list of objects .* with keys \['rows'\]"):
        load_rows(DataConfig(path=str(p)))


def test_parquet_rows_and_max_samples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "answer": str(i)} for i in range(5)]), p)
    rows = load_rows(DataConfig(path=str(p), max_samples=3))
    assert rows.rows == [{"prompt": f"p{i}", "answer": str(i)} for i in range(3)]
    assert rows.locations[2] == f"{p} row 2"
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match=re.escape(f"{bad}: cannot read as parquet")):
        load_rows(DataConfig(path=str(bad)))


def test_saved_datasets_directory_and_its_splits(tmp_path):
    import datasets

    items = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(DataConfig(path=str(tmp_path / "ds")))
    assert rows.rows == items and rows.locations == [f"{tmp_path / 'ds'} row 0", f"{tmp_path / 'ds'} row 1"]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(items),
                          "test": datasets.Dataset.from_list(items[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(DataConfig(path=str(tmp_path / "dd")), split="test").rows == items[:1]
    with pytest.raises(DataError, match=r"no split 'valid' \(data.split\); it has \['test', 'train'\]"):
        load_rows(DataConfig(path=str(tmp_path / "dd"), split="valid"))


def test_hub_name_failure_is_a_data_error(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):  # no network in tests: stand in for an unreachable hub
        calls.append((path, name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"'someorg/someset' is neither a local file nor a reachable dataset.*offline"):
        load_rows(DataConfig(path="someorg/someset", split="train", subset="main"))
    assert calls == [("someorg/someset", "main", "train")]


def test_resolve_format(tmp_path):
    (tmp_path / "x.txt").write_text("{}")
    (tmp_path / "d").mkdir()
    assert resolve_format("demo:arithmetic") == "demo"
    assert resolve_format("org/name") == "hub"
    assert resolve_format(str(tmp_path / "d")) == "saved_dataset"
    assert resolve_format(str(tmp_path / "x.txt"), "jsonl") == "jsonl"
    with pytest.raises(DataError, match=r"cannot tell the format of .*x.txt"):
        resolve_format(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match=r"does not exist"):
        resolve_format("./missing_dir/file")


# ---- demo sets ----------------------------------------------------------------------------------

def _check_sentence(prompt, sentence):
    """'What is a op b?' and 'a op b = r. The answer is r.' -> (r, true result)."""
    a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?.*", prompt).groups()
    m = re.fullmatch(rf"{a} \{op} {b} = (\d+)\. The answer is (\d+)\.", sentence)
    assert m and m.group(1) == m.group(2), sentence
    truth = int(a) + int(b) if op == "+" else int(a) - int(b)
    return int(m.group(1)), truth


def test_demo_sets_are_deterministic_and_sized():
    for name in DEMO_SETS:
        a, b, c = make_demo_rows(name, 50, seed=0), make_demo_rows(name, 50, seed=0), make_demo_rows(name, 50, seed=1)
        assert a == b and a != c and len(a) == 50, name
    rows = load_rows(DataConfig(path="demo:arithmetic", demo_size=7))
    assert len(rows) == 7 and rows.locations[6] == "demo:arithmetic row 6"
    with pytest.raises(DataError, match=r"unknown demo set 'demo:nope'; choose one of demo:arithmetic"):
        load_rows(DataConfig(path="demo:nope"))


def test_demo_contents_are_correct():
    for r in make_demo_rows("arithmetic", 200):
        got, truth = _check_sentence(r["prompt"], r["response"])
        assert got == truth >= 0 and r["answer"] == str(truth)
    for r in make_demo_rows("arithmetic_rl", 200):
        a, b = map(int, re.fullmatch(r"What is (\d) \+ (\d)\? Reply with the number only\.", r["prompt"]).groups())
        assert r["answer"] == str(a + b) and 1 <= len(r["answer"]) <= 2
    for r in make_demo_rows("preferences", 200):
        chosen, truth = _check_sentence(r["prompt"], r["chosen"])
        rejected, _ = _check_sentence(r["prompt"], r["rejected"])
        assert chosen == truth and rejected != truth and rejected >= 0 and abs(rejected - truth) <= 3
    labels = []
    for r in make_demo_rows("kto", 200):
        shown, truth = _check_sentence(r["prompt"], r["completion"])
        assert r["label"] is (shown == truth)
        labels.append(r["label"])
    assert 60 < sum(labels) < 140  # about half desirable


# ---- eval split ---------------------------------------------------------------------------------

def _rows(n):
    return RowSet([{"i": i} for i in range(n)], [f"f:{i + 1}" for i in range(n)], "f")


def test_split_is_seeded_disjoint_and_sized():
    rows = _rows(100)
    train, ev = split_rows(rows, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90  # round(0.1 * 100)
    assert sorted(r["i"] for r in train.rows + ev.rows) == list(range(100))
    assert ev.locations == [f"f:{r['i'] + 1}" for r in ev.rows]  # locations travel with their rows
    assert split_rows(rows, 0.1, seed=3)[1].rows == ev.rows
    assert split_rows(rows, 0.1, seed=4)[1].rows != ev.rows
    assert len(split_rows(_rows(5), 0.01, seed=0)[1]) == 1  # at least one row held out
    with pytest.raises(DataError, match=r"leaves no training rows"):
        split_rows(_rows(1), 0.5, seed=0)


def test_split_eval_from_config(tmp_path):
    rows = _rows(20)
    assert split_eval(rows, DataConfig(), seed=0) == (rows, None)
    train, ev = split_eval(rows, DataConfig(eval_fraction=0.25), seed=0)
    assert (len(train), len(ev)) == (15, 5)
    path = write_lines(tmp_path / "eval.jsonl", [row(0)])
    train, ev = split_eval(rows, DataConfig(eval_path=path), seed=0)
    assert train is rows and ev.rows == [{"prompt": "p0", "response": "r0"}]
    with pytest.raises(ConfigError, match=r"either data.eval_fraction or data.eval_path"):
        split_eval(rows, DataConfig(eval_path=path, eval_fraction=0.1), seed=0)
    # A demo eval set is generated with another seed than the demo train set.
    demo_train = load_rows(DataConfig(demo_size=30))
    assert split_eval(demo_train, DataConfig(demo_size=30, eval_path="demo:arithmetic"), 0)[1].rows != demo_train.rows
