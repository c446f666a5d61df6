"""Tasks and loaders (data.py), on small files the tests write."""

import json
from collections import Counter

import pytest
import torch

from conftest import SHARED_DATA, write_lines
from lora_diffusion.data import (batch_schedule, collate, encode, load_task, pack_text, parse_verbalizers,
                                 read_table, response_length_for, subsample)
from lora_diffusion.errors import UserError


@pytest.fixture
def sentiment_csv(tmp_path):
    rows = ["text,label"] + [f"a {'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(40)]
    return write_lines(tmp_path / "reviews.csv", rows)


def test_read_csv_tsv_jsonl_and_headerless(tmp_path):
    csv_rows = read_table(write_lines(tmp_path / "a.csv", ['text,label', '"hi, there",x']))
    assert csv_rows == [{"text": "hi, there", "label": "x"}]
    tsv_rows = read_table(write_lines(tmp_path / "b.tsv", ['sentence\tlabel', 'it \'s "great" \t1']))
    assert tsv_rows[0]["sentence"] == 'it \'s "great" ' and tsv_rows[0]["label"] == "1"
    jl = read_table(write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "x", "label": 1})]))
    assert jl == [{"text": "x", "label": 1}]
    headerless = read_table(write_lines(tmp_path / "d.csv", ['"3","t","d"']), columns=["label", "title", "desc"])
    assert headerless == [{"label": "3", "title": "t", "desc": "d"}]


def test_csv_becomes_a_classification_task_with_derived_and_given_verbalizers(sentiment_csv):
    task = load_task("csv", train_file=sentiment_csv)
    assert task.kind == "classification" and task.labels == ["neg", "pos"]
    assert len(task.eval) == 4 and len(task.train) == 36  # 10% held out
    assert not {e["input"] for e in task.eval} & {e["input"] for e in task.train}
    assert "neg" in task.train[0]["instruction"] and "pos" in task.train[0]["instruction"]
    mapped = load_task("csv", train_file=sentiment_csv, verbalizers="neg=negative,pos=positive",
                       instruction="sentiment ?")
    assert mapped.labels == ["negative", "positive"]
    assert {e["response"] for e in mapped.train} == {"negative", "positive"}
    assert mapped.train[0]["instruction"] == "sentiment ?"


def test_held_out_split_does_not_depend_on_the_training_seed(sentiment_csv):
    tasks = [load_task("csv", train_file=sentiment_csv, seed=s, max_train=20, max_eval=3) for s in (0, 7)]
    assert tasks[0].eval == tasks[1].eval  # every seed is scored on the same examples
    assert tasks[0].train != tasks[1].train  # while the train subset is the seed's own
    for task in tasks:
        assert not {e["input"] for e in task.eval} & {e["input"] for e in task.train}


def test_generation_task_from_response_column(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"doc": f"doc {i}", "summary": f"Sum {i}"}) for i in range(10)])
    task = load_task("jsonl", train_file=path, text_column="doc", response_column="summary")
    assert task.kind == "generation" and task.train[0]["response"].startswith("sum")


@pytest.mark.parametrize("kwargs, message", [
    ({"train_file": "nope.csv"}, "not found"),
    ({"text_column": "review"}, "column 'review' not in"),
    ({"label_column": "stars"}, "column 'stars' not in"),
    ({"verbalizers": "neg=negative"}, "label 'pos'"),
])
def test_bad_input_is_a_clear_error(sentiment_csv, kwargs, message):
    args = {"train_file": sentiment_csv, **kwargs}
    with pytest.raises(UserError, match=message):
        load_task("csv", **args)


def test_empty_file_and_unknown_task(tmp_path):
    with pytest.raises(UserError, match="no data rows"):
        load_task("csv", train_file=write_lines(tmp_path / "e.csv", ["text,label"]))
    with pytest.raises(UserError, match="unknown task"):
        load_task("imdb")
    with pytest.raises(UserError, match="needs --train-file"):
        load_task("csv")


def test_parse_verbalizers():
    assert parse_verbalizers("0=Negative, 1=positive") == {"0": "negative", "1": "positive"}
    assert parse_verbalizers("yes,no") == {"yes": "yes", "no": "no"}
    assert parse_verbalizers(None) is None


def test_subsample_is_seeded_and_stratified():
    examples = [{"input": str(i), "response": "a" if i < 300 else "b"} for i in range(400)]
    one, again = subsample(examples, 100, seed=1), subsample(examples, 100, seed=1)
    assert one == again and len(one) == 100
    counts = Counter(e["response"] for e in one)
    assert counts["a"] == 75 and counts["b"] == 25
    assert subsample(examples, 100, seed=2) != one


def test_encode_layout_collate_and_length_errors(tiny):
    tok = tiny.tokenizer
    examples = [{"instruction": "classify", "input": "a fine film", "response": "positive"},
                {"instruction": "classify", "input": "dull", "response": "negative"}]
    length = response_length_for(tok, examples)
    assert length == 2  # one word + the end marker
    enc = encode(tok, examples, length, max_length=64)
    assert enc.prompts[0][0] == tok.cls_token_id and enc.prompts[0][-1] == tok.sep_token_id
    assert enc.responses[0][-1] == tok.sep_token_id
    batch = collate(enc, [0, 1], tok.pad_token_id)
    assert batch["response_mask"].sum(1).tolist() == [2, 2]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding
    assert batch["instruction"].shape[0] == 2
    long = [{"instruction": "classify", "input": "word " * 100, "response": "positive"}]
    with pytest.raises(UserError, match="longer than the model's 32 positions; pass --truncate"):
        encode(tok, long, 2, max_length=32)
    cut = encode(tok, long, 2, max_length=32, truncate=True)
    assert cut.n_truncated == 1 and len(cut.prompts[0]) + 2 == 32


def test_batch_schedule_is_resumable_and_covers_each_epoch():
    indices = batch_schedule(10, 4, seed=0)
    first_epoch = [i for step in range(2) for i in indices(step)] + indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert indices(7) == batch_schedule(10, 4, seed=0)(7)


def test_pack_text_rows(tiny):
    rows = pack_text(tiny.tokenizer, ["one two three", "four five"] * 20, seq_len=8)
    assert rows.shape[1] == 8 and torch.all(rows[:, 0] == tiny.tokenizer.cls_token_id)


@pytest.mark.parametrize("name", ["suite_sentiment", "suite_topic", "suite_struct"])
def test_builtin_suite_loads(name):
    task = load_task(name)
    assert len(task.train) >= 1000 and len(task.eval) >= 200
    if name == "suite_struct":
        assert task.kind == "generation"
    else:
        assert task.kind == "classification" and len(task.labels) in (2, 4)


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="shared/data not present")
def test_real_sst2_and_agnews_from_the_shared_folder():
    sst = load_task("sst2", data_dir=SHARED_DATA)
    assert sst.info["full_train"] == 67349 and sst.info["full_eval"] == 872
    assert sst.labels == ["negative", "positive"]
    ag = load_task("agnews", data_dir=SHARED_DATA, max_train=400)
    assert len(ag.eval) == 7600 and len(ag.train) == 400
    assert set(Counter(e["response"] for e in ag.eval).values()) == {1900}
    title = load_task("agnews_title", data_dir=SHARED_DATA)
    assert title.kind == "generation" and len(title.train) == 2000
