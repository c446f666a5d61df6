"""The lessons cache: the notebooks' adapters and comparison runs, trained once per base, then read back."""

import json

import pytest

from lora_diffusion import lessons
from lora_diffusion.cli import main


@pytest.fixture
def small_lessons(monkeypatch, tmp_path):
    """A cache in tmp_path, two steps per run, and a lesson set of one adapter and a two-run comparison."""
    monkeypatch.setenv("LORA_DIFFUSION_LESSONS", str(tmp_path / "lessons"))
    monkeypatch.setenv("NOTEBOOK_STEPS", "2")
    monkeypatch.setattr(lessons, "ADAPTERS", [("suite_topic", "lora")])
    monkeypatch.setattr(lessons, "COMPARE", {**lessons.COMPARE, "methods": ("bitfit", "lora"), "seeds": (0,),
                                             "max_eval": 16})
    monkeypatch.setattr(lessons, "ADAPTER_EVAL", 16)
    return tmp_path / "lessons"


def test_an_adapter_is_trained_once_per_base_then_read_back(small_lessons, tiny_base_dir, capsys):
    (first,) = lessons.adapters([("suite_topic", "lora")], base=tiny_base_dir)
    assert "lora on suite_topic is not in the lessons cache: training it now" in capsys.readouterr().out
    assert first.parent == lessons.cache_dir(tiny_base_dir) and first.parent.parent == small_lessons
    assert first.name == "lora-suite_topic-2steps"  # another budget is another run
    assert (first / "adapter" / "adapter_config.json").is_file() and not list(first.parent.glob("*.partial"))
    (again,) = lessons.adapters([("suite_topic", "lora")], base=tiny_base_dir)
    assert again == first and "training" not in capsys.readouterr().out


def test_a_run_killed_halfway_is_trained_again_from_scratch(small_lessons, tiny_base_dir):
    folder = lessons.run_folder("suite_topic", "lora", 2, tiny_base_dir)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("{not json\n")
    assert lessons.adapters([("suite_topic", "lora")], base=tiny_base_dir) == [folder]
    assert (folder / "results.json").is_file() and not partial.exists()
    assert "{not json" not in (folder / "metrics.jsonl").read_text()


def test_the_lessons_command_builds_the_cache_once(small_lessons, tiny_base_dir, capsys):
    assert not lessons.is_warm(tiny_base_dir)
    assert main(["lessons", "--base", str(tiny_base_dir)]) == 0
    out = capsys.readouterr().out
    assert "training it now" in out and "training them now" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["cache"] == str(lessons.cache_dir(tiny_base_dir))
    assert lessons.is_warm(tiny_base_dir)
    assert main(["lessons", "--base", str(tiny_base_dir)]) == 0
    assert "training" not in capsys.readouterr().out  # everything read back
    # a notebook comparing fewer methods rewrites the folder's table, not the runs: still warm
    lessons.compare(lessons.COMPARE["task"], lessons.COMPARE["methods"][:1], lessons.COMPARE["seeds"][:1],
                    base=tiny_base_dir)
    assert "training" not in capsys.readouterr().out and lessons.is_warm(tiny_base_dir)
