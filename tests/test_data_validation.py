"""Bad data files and labels end in one readable UserError (data.py), never a traceback."""

import csv
import json
import os
from pathlib import Path

import pytest

from conftest import write_lines
from lora_diffusion import data
from lora_diffusion.data import (check_task_fits_adapter, load_eval_task, load_task, parse_verbalizers,
                                 read_table)
from lora_diffusion.errors import UserError

SENTIMENT = {"name": "reviews", "kind": "classification", "labels": ["positive", "negative"],
             "instruction": "sentiment ?", "source": "reviews.csv"}
TITLES = {"name": "titles", "kind": "generation", "labels": None, "instruction": "title ?", "source": "t.csv"}


def labelled(path, labels, header="text,label"):
    """A CSV with one row per label: 'text i,label'."""
    return write_lines(path, [header] + [f"text {i},{label}" for i, label in enumerate(labels)])


def two_classes(n=20):
    return ["pos" if i % 2 else "neg" for i in range(n)]


# --- encodings and binary files ------------------------------------------------------

def test_latin1_file_names_the_first_bad_byte(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,pos\n".encode("latin-1"))
    message = r"latin.csv is not UTF-8 text \(first bad byte at offset 14\); save it as UTF-8"
    with pytest.raises(UserError, match=message):
        read_table(path)


def test_binary_file_is_not_text(tmp_path):
    path = tmp_path / "image.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(UserError, match="offset 0"):
        read_table(path)


def test_utf16_without_bom_is_caught_by_its_nul_bytes(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_bytes("text,label\nhi,pos\n".encode("utf-16-le"))
    with pytest.raises(UserError, match="wide.csv line 1 contains a NUL byte"):
        read_table(path)


def test_first_bad_byte_across_chunks(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(b"a" * (1 << 20) + "é".encode() + b"\xff")  # a valid character split by the chunk edge
    assert data._first_bad_byte(path) == (1 << 20) + 2


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nhi,pos\n".encode())
    assert read_table(path) == [{"text": "hi", "label": "pos"}]


# --- CSV structure -------------------------------------------------------------------

def test_long_fields_are_read_up_to_the_limit(tmp_path):
    assert csv.field_size_limit() == data.CSV_FIELD_LIMIT  # set once, at import
    path = write_lines(tmp_path / "long.csv", ["text,label", f"{'x' * data.CSV_FIELD_LIMIT},pos"])
    assert len(read_table(path)[0]["text"]) == data.CSV_FIELD_LIMIT  # over the csv module's default of 131,072
    path = write_lines(tmp_path / "over.csv", ["text,label", f"{'x' * (data.CSV_FIELD_LIMIT + 1)},pos"])
    with pytest.raises(UserError, match="over.csv line 2 has a field longer than 1,000,000 characters"):
        read_table(path)
    assert csv.field_size_limit() == data.CSV_FIELD_LIMIT


def test_field_over_the_limit_names_the_line(tmp_path):
    path = write_lines(tmp_path / "huge.csv", ["text,label", "a,pos", f"{'x' * (data.CSV_FIELD_LIMIT + 1)},pos"])
    with pytest.raises(UserError, match="huge.csv line 3 has a field longer than 1,000,000 characters"):
        read_table(path)


@pytest.mark.parametrize("lines, message", [
    (["text,label", "a,pos", "b,c,neg"], "r.csv line 3 has 3 fields but the header has 2; put double quotes"),
    (["text,label", "a,pos", "lonely"], "r.csv line 3 has 1 field but the header has 2"),
    (["text,label", '"open,pos', "b,neg"], "r.csv line 2 has 1 field .* runs on to line 3: is a closing quote"),
    (["text,text,label", "a,b,pos"], "names column 'text' twice"),
])
def test_ragged_csv_rows(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        read_table(write_lines(tmp_path / "r.csv", lines))


def test_ragged_tsv_and_headerless_rows(tmp_path):
    with pytest.raises(UserError, match="r.tsv line 2 has 3 fields but the header has 2; values cannot contain tabs"):
        read_table(write_lines(tmp_path / "r.tsv", ["sentence\tlabel", "a\tb\t1"]))
    with pytest.raises(UserError, match=r"h.csv line 2 has 2 fields but 3 columns were given \(label, title, desc\)"):
        read_table(write_lines(tmp_path / "h.csv", ["1,t,d", "2,t"]), columns=["label", "title", "desc"])


def test_tsv_keeps_bare_quotes_and_blank_rows_are_skipped(tmp_path):
    rows = read_table(write_lines(tmp_path / "s.tsv", ["sentence\tlabel", 'a "quoted\t1', "", " \t ", "b\t0"]))
    assert [r["sentence"] for r in rows] == ['a "quoted', "b"]
    assert [r.line for r in rows] == [2, 5]


# --- JSONL ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("3", "number"), ('"hi"', "string"), ("null", "null")])
def test_jsonl_lines_must_be_objects(tmp_path, line, kind):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a", "label": "x"}), line])
    with pytest.raises(UserError, match=f"d.jsonl line 2 is a JSON {kind}, not an object"):
        read_table(path)


def test_jsonl_bad_json_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"d.jsonl line 2 is not valid JSON \(Expecting value\)$"):
        read_table(write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', '{"text": ']))


def test_jsonl_number_past_the_int_string_limit_names_the_line(tmp_path):
    """Python refuses to parse integers of more than 4,300 digits: a ValueError, not a JSONDecodeError."""
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", "label": %s}' % ("9" * 5000)])
    with pytest.raises(UserError, match=r"d.jsonl line 2 is not valid JSON \(a number of more than 4,300 digits; "
                                        r"write it as a string, in quotes\)$"):
        read_table(path)


# --- files that are not regular files ------------------------------------------------

def test_a_folder_or_a_device_is_not_a_regular_file(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.csv"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(UserError, match=r"folder.csv is not a regular file \(a folder, device or pipe\?\)"):
        read_table(tmp_path / "folder.csv")
    if Path("/dev/zero").exists():
        with pytest.raises(UserError, match="/dev/zero is not a regular file"):
            load_task("csv", train_file="/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_pipe_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it would block until a writer came
    with pytest.raises(UserError, match="pipe.jsonl is not a regular file"):
        read_table(tmp_path / "pipe.jsonl")


# --- empty files ---------------------------------------------------------------------

def test_empty_files(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(UserError, match="e.csv is empty"):
        read_table(tmp_path / "e.csv")
    with pytest.raises(UserError, match="h.csv has no data rows"):
        read_table(write_lines(tmp_path / "h.csv", ["text,label"]))
    with pytest.raises(UserError, match="b.jsonl has no data rows"):
        read_table(write_lines(tmp_path / "b.jsonl", ["", "  "]))


# --- columns -------------------------------------------------------------------------

def test_every_row_needs_the_column(tmp_path):
    path = write_lines(tmp_path / "j.jsonl", [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)]
                       + [json.dumps({"text": "no label"})])
    with pytest.raises(UserError, match="j.jsonl line 5 has no value in column 'label'"):
        load_task("jsonl", train_file=path)
    with pytest.raises(UserError, match="column 'stars' not in .*j.jsonl; it has: text, label"):
        load_task("jsonl", train_file=path, label_column="stars")
    path = write_lines(tmp_path / "n.jsonl", [json.dumps({"text": "t", "label": None})] * 3)
    with pytest.raises(UserError, match="n.jsonl line 1 has a null value in column 'label'"):
        load_task("jsonl", train_file=path, eval_file=path)


@pytest.mark.parametrize("column, value, message", [
    ("label", [0], "has a list in column 'label'; the label must be text or a number"),
    ("label", {"a": 1}, "has an object in column 'label'; the label must be text or a number"),
    ("text", ["a", "b"], "has a list in column 'text'; the input must be text or a number"),
    ("text", {"t": "x"}, "has an object in column 'text'; the input must be text or a number"),
])
def test_json_lists_and_objects_are_not_labels_or_texts(tmp_path, column, value, message):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)] + [{"text": "x", "label": 1, column: value}]
    path = write_lines(tmp_path / "j.jsonl", map(json.dumps, rows))
    with pytest.raises(UserError, match=f"j.jsonl line 7 {message}$"):
        load_task("jsonl", train_file=path)
    with pytest.raises(UserError, match=f"j.jsonl line 7 {message}$"):
        load_eval_task("jsonl", path, {**SENTIMENT, "labels": ["0", "1"]})


def test_bools_and_numbers_are_labels(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [json.dumps({"text": f"t{i}", "label": i % 2 == 0}) for i in range(10)])
    assert sorted(load_task("jsonl", train_file=path).labels) == ["false", "true"]


def test_empty_inputs_and_responses_name_the_line(tmp_path):
    path = labelled(tmp_path / "c.csv", two_classes(6))
    with open(path, "a") as f:
        f.write("  ,pos\n")
    with pytest.raises(UserError, match=r"c.csv line 8 has an empty input \(column 'text'\); fill it in"):
        load_task("csv", train_file=path)
    rows = [{"doc": f"doc {i}", "summary": f"sum {i}"} for i in range(6)]
    gen = write_lines(tmp_path / "g.jsonl", map(json.dumps, rows + [{"doc": "doc", "summary": " "}]))
    with pytest.raises(UserError, match=r"g.jsonl line 7 has an empty response \(column 'summary'\)"):
        load_task("jsonl", train_file=gen, text_column="doc", response_column="summary")
    with pytest.raises(UserError, match=r"g.jsonl line 7 has an empty response"):
        load_eval_task("jsonl", gen, TITLES, text_column="doc", response_column="summary")
    gen = write_lines(tmp_path / "h.jsonl", map(json.dumps, rows + [{"doc": "", "summary": "sum"}]))
    with pytest.raises(UserError, match=r"h.jsonl line 7 has an empty input \(column 'doc'\)"):
        load_task("jsonl", train_file=gen, text_column="doc", response_column="summary")


def test_text_and_answer_columns_must_differ(tmp_path):
    path = labelled(tmp_path / "r.csv", two_classes())
    message = r"^the text and label columns are both 'label'; name the labels with --label-column"
    with pytest.raises(UserError, match=message):
        load_task("csv", train_file=path, text_column="label")
    with pytest.raises(UserError, match="the text and label columns are both 'text'"):
        load_task("csv", train_file=path, label_column="text")
    with pytest.raises(UserError, match="the text and response columns are both 'text'"):
        load_task("csv", train_file=path, response_column="text")
    with pytest.raises(UserError, match="the text and label columns are both 'text'"):
        load_eval_task("csv", path, SENTIMENT, label_column="text")
    with pytest.raises(UserError, match="the text and response columns are both 'text'"):
        load_eval_task("csv", path, TITLES, response_column="text")
    with pytest.raises(UserError, match="the text and label columns are both 'label'"):
        load_task("hub:owner/name", text_column="label")  # before any network


def test_rows_without_a_file_are_named_by_index():
    with pytest.raises(UserError, match="row 2 of the train data has no value in column 'a'"):
        data._column([{"a": 1}, {"b": 2}], "a", "the train data")


# --- row caps ------------------------------------------------------------------------

def test_max_rows_stops_reading_at_the_cap(tmp_path):
    # Row 8 is broken: the cap's error comes first, so reading stopped before it.
    path = labelled(tmp_path / "big.csv", two_classes(6))
    with open(path, "a") as f:
        f.write("a,b,c\n")
    with pytest.raises(UserError, match=r"big.csv has more than 5 rows; the limit here is 5"):
        read_table(path, max_rows=5)
    with pytest.raises(UserError, match="has more than 5 rows"):
        load_task("csv", train_file=path, max_rows=5)
    assert len(read_table(labelled(tmp_path / "ok.csv", two_classes(6)), max_rows=6)) == 6


def test_max_heldout_caps_the_slice_carved_from_the_train_file(tmp_path):
    path = labelled(tmp_path / "r.csv", two_classes(100))
    task = load_task("csv", train_file=path, eval_fraction=0.5, max_heldout=10)
    assert len(task.eval) == 10 and len(task.train) == 90


# --- labels --------------------------------------------------------------------------

def test_train_data_needs_two_labels(tmp_path):
    with pytest.raises(UserError, match=r"the train data has only one label \('pos'\); a classifier needs at least"):
        load_task("csv", train_file=labelled(tmp_path / "one.csv", ["pos"] * 10))


@pytest.mark.parametrize("missing", ["", "nan", "NaN", "null"])
def test_missing_labels_are_errors(tmp_path, missing):
    path = labelled(tmp_path / "m.csv", two_classes(6) + [missing])
    with pytest.raises(UserError, match=f"m.csv line 8 has no label \\('{missing}' in column 'label'\\)"):
        load_task("csv", train_file=path)


def test_none_is_a_class_name_not_a_missing_label(tmp_path):
    """Emotion and intent datasets have a real 'none' class; only empty, NaN and null mean no label."""
    path = labelled(tmp_path / "m.csv", (["joy", "anger", "none"] * 10))
    task = load_task("csv", train_file=path)
    assert sorted(task.labels) == ["anger", "joy", "none"]


def test_eval_label_unseen_in_training(tmp_path):
    train = labelled(tmp_path / "train.csv", two_classes(10))
    evals = labelled(tmp_path / "eval.csv", ["pos", "neg", "meh"])
    message = r"the eval data has label 'meh' \(.*eval.csv line 4\) that the train data never has"
    with pytest.raises(UserError, match=message):
        load_task("csv", train_file=train, eval_file=evals)
    # Given verbalizers that name the label do not make it learnable: the train data never answers 'neutral'.
    with pytest.raises(UserError, match=message):
        load_task("csv", train_file=train, eval_file=evals, verbalizers="pos=positive,neg=negative,meh=neutral")
    # A word no data has is allowed (an answer the classifier may give), and so is a held-out set with fewer labels.
    task = load_task("csv", train_file=train, eval_file=labelled(tmp_path / "e2.csv", ["pos", "pos"]),
                     verbalizers="pos=positive,neg=negative,meh=neutral")
    assert task.labels == ["positive", "negative", "neutral"]


def test_long_labels_are_cut_in_messages(tmp_path):
    evals = labelled(tmp_path / "eval.csv", ["pos", "x" * 500])
    with pytest.raises(UserError) as err:
        load_task("csv", train_file=labelled(tmp_path / "train.csv", two_classes()), eval_file=evals)
    assert "x" * 41 not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("0=negative,1=", r"part '1=' needs a label and a word"),
    ("=negative,1=positive", r"part '=negative' needs a label and a word"),
    ("neg,,pos", r"part '' needs a label and a word"),
    ("0=negative,0=bad", r"maps label '0' twice"),
    ("0=positive,1=Positive", r"labels '0' and '1' both map to 'positive'; verbalizer words must be distinct"),
])
def test_bad_verbalizer_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_verbalizers(spec)


# --- evaluating an adapter on a file without its train file --------------------------

def test_eval_task_from_the_adapter(tmp_path):
    path = labelled(tmp_path / "test.csv", ["Positive", "negative", "positive"])
    task = load_eval_task("csv", path, SENTIMENT)
    assert task.train == [] and task.kind == "classification" and task.labels == ["positive", "negative"]
    assert task.name == "test"  # the file's task, posed as the adapter's
    assert [e["response"] for e in task.eval] == ["positive", "negative", "positive"]
    assert {e["instruction"] for e in task.eval} == {"sentiment ?"}
    assert len(load_eval_task("csv", path, SENTIMENT, max_eval=2).eval) == 2
    numbers = labelled(tmp_path / "n.csv", ["1", "0"])
    mapped = load_eval_task("csv", numbers, SENTIMENT, verbalizers="1=positive,0=negative")
    assert [e["response"] for e in mapped.eval] == ["positive", "negative"]


def test_eval_task_rejects_labels_the_adapter_does_not_know(tmp_path):
    path = labelled(tmp_path / "test.csv", ["positive", "1"])
    with pytest.raises(UserError, match=r"label '1' in .*test.csv line 3 is not one the adapter knows "
                                        r"\(positive, negative\); pass --verbalizers"):
        load_eval_task("csv", path, SENTIMENT)


def test_eval_task_for_a_generation_adapter(tmp_path):
    path = write_lines(tmp_path / "t.csv", ["text,title", "a long story,A Title"])
    with pytest.raises(UserError, match="pass --response-column"):
        load_eval_task("csv", path, TITLES)
    task = load_eval_task("csv", path, TITLES, response_column="title")
    assert task.kind == "generation" and task.eval[0]["response"] == "a title" and task.labels is None


def test_adapter_must_fit_the_task(tmp_path):
    topics = data.Task("agnews", "classification", [], [{"instruction": "?", "input": "x", "response": "world"}],
                       ["world", "sports", "business", "science"])
    with pytest.raises(UserError, match="adapter sst2_lora answers positive, negative; "
                                        "task agnews needs world, sports, business, science"):
        check_task_fits_adapter(topics, SENTIMENT, "sst2_lora")
    with pytest.raises(UserError, match="trained for generation and task agnews is classification"):
        check_task_fits_adapter(topics, TITLES, "titles_lora")
    same = load_eval_task("csv", labelled(tmp_path / "t.csv", ["positive", "negative"]), SENTIMENT)
    check_task_fits_adapter(same, SENTIMENT, "sst2_lora")  # no error


# --- hub:NAME reads the hub, never this machine's files --------------------------------

@pytest.mark.parametrize("spec", ["hub:/tmp/x", "hub:../x", "hub:./x", "hub:.x", "hub:a/b/c", "hub:a..b",
                                  "hub:a\\b", "hub:", "hub:/", "hub:~/x", "hub:a/", "hub:x\ny"])
def test_hub_names_must_be_hub_ids(spec, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(UserError, match=r"^hub:.* is not a Hugging Face dataset id \(owner/name\)( but a local path)?; "
                                        r"for a local file use --task csv/tsv/jsonl --train-file$"):
        load_task(spec)


def test_hub_names_that_are_local_paths_or_file_readers_are_refused(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reviews").mkdir()
    (tmp_path / "owner" / "name").mkdir(parents=True)
    for spec in ("hub:reviews", "hub:owner/name"):
        with pytest.raises(UserError, match=f"^{spec} is not a Hugging Face dataset id \\(owner/name\\) but a "
                                            "local path; for a local file use --task csv/tsv/jsonl --train-file$"):
            load_task(spec)
    for spec in ("hub:csv", "hub:json", "hub:parquet:default"):  # load_dataset('csv') reads the working folder
        with pytest.raises(UserError, match="names a file reader of the datasets library, not a hub dataset"):
            load_task(spec)
    for spec in ("hub:glue:../x", "hub:glue:/tmp", "hub:glue:a/b", "hub:glue:.x", "hub:C:/x"):
        with pytest.raises(UserError, match=r"the config must be a plain name \(letters, digits, '.', '_', '-'\)$"):
            load_task(spec)


def test_hub_ids_reach_load_dataset(monkeypatch):
    import datasets
    calls = []
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return {"train": rows, "validation": rows[:4]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("hub:stanfordnlp/sst2")
    assert task.name == "hub:stanfordnlp/sst2" and task.labels == ["0", "1"] and len(task.eval) == 4
    load_task("hub:glue:sst2")
    load_task("hub:user_1/my-data.v2:config_1.0")
    assert calls == [("stanfordnlp/sst2", None), ("glue", "sst2"), ("user_1/my-data.v2", "config_1.0")]

    def offline(name, config):
        raise ConnectionError("")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"could not load 'glue' from the hub \(ConnectionError\); offline"):
        load_task("hub:glue")


# --- the AG News reader (tabs inside descriptions) still works ------------------------

def test_agnews_reader_with_tabs_in_descriptions(tmp_path):
    folder = tmp_path / "ag_news"
    folder.mkdir()
    write_lines(folder / "train_subset_10k.tsv", ["a story\twith a tab\tworld", "a match\tsports", "",
                                                  "shares fell\tbusiness", "a chip\tsci/tech"])
    write_lines(folder / "test.csv", ['"1","t","world news"', '"2","t","a game"'])
    task = load_task("agnews", data_dir=tmp_path)
    assert task.train[0]["input"] == "a story with a tab" and task.train[0]["response"] == "world"
    assert [e["response"] for e in task.eval] == ["world", "sports"]


# --- any bad file: a UserError, never a traceback -----------------------------------

@pytest.mark.parametrize("body", [b"", b"\n\n", b"\xff\xfe", b"\x00\x01\x02", b'"', b"text\n\x00",
                                  b"{}\n", b'{"text": [1], "label": {"a": 1}}\n', b"[[[[[[", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_bad_files_end_in_a_user_error(tmp_path, body, fmt):
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(body)
    for load in (lambda: load_task(fmt, train_file=path), lambda: load_eval_task(fmt, path, SENTIMENT)):
        with pytest.raises(UserError) as err:
            load()
        assert "\n" not in str(err.value)
