"""The command line: bad input ends in one readable line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest

from conftest import write_lines
from lora_diffusion.cli import main
from lora_diffusion.methods import METHODS


@pytest.fixture
def reviews(tmp_path):
    rows = ["text,label"] + [f"review {i} {'great' if i % 2 else 'awful'},{i % 2}" for i in range(30)]
    return write_lines(tmp_path / "reviews.csv", rows)


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refuses a flag's value before the command runs
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--task", "csv", "--train-file", "missing.csv"], "data file not found"),
    (["--task", "csv", "--train-file", "{empty}"], "no data rows"),
    (["--task", "csv", "--train-file", "{reviews}", "--text-column", "body"], "column 'body' not in"),
    (["--task", "csv", "--train-file", "{reviews}", "--verbalizers", "0=bad"], "label '1'"),
    (["--task", "csv", "--train-file", "{reviews}", "--base", "{not_a_model}"], "not a model folder"),
    (["--task", "csv", "--train-file", "{reviews}", "--base", "{nowhere}"], "base model folder not found"),
    (["--task", "csv", "--train-file", "{long}", "--base", "{tiny}"], "longer than the model's 128 positions"),
    (["--task", "csv", "--train-file", "{reviews}", "--method", "magic"], "unknown method"),
    (["--task", "csv", "--train-file", "{reviews}", "--method", "lora", "--option", "rank=4"], "has no option 'rank'"),
    (["--task", "csv", "--train-file", "{reviews}", "--method", "lora_diffusion", "--option", "injection=middle"],
     "option 'injection' must be 'final' or 'blocks'"),
    (["--task", "imdb"], "unknown task"),
])
def test_train_errors(capsys, tmp_path, reviews, tiny_base_dir, extra, message):
    empty = write_lines(tmp_path / "empty.csv", ["text,label"])
    long = write_lines(tmp_path / "long.csv", ["text,label"] + [("word " * 200) + ",1", "short,0"] * 10)
    (tmp_path / "not_a_model").mkdir()
    names = {"empty": empty, "reviews": reviews, "not_a_model": tmp_path / "not_a_model",
             "nowhere": tmp_path / "nowhere", "long": long, "tiny": tiny_base_dir}
    argv = ["train", "--steps", "1", "--batch-size", "2", "--sampler-steps", "1", "--out", tmp_path / "run"]
    argv += [a.format(**names) for a in extra]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in err


def test_data_efficiency_without_a_task_is_refused(capsys, tmp_path):
    code, out, err = run_cli(capsys, "analyze", "data-efficiency", "--out", tmp_path / "d")
    assert code == 2 and err.strip().splitlines()[-1] == "error: data-efficiency needs --task"


def test_error_exit_from_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_diffusion.cli", "eval", "--adapter", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: file not found: {tmp_path / 'adapter_config.json'}"]


@pytest.mark.parametrize("method", list(METHODS))
def test_train_then_eval_prints_json_and_matches(capsys, tmp_path, reviews, tiny_base_dir, method):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--base", tiny_base_dir, "--task", "csv", "--train-file", reviews,
                             "--steps", 4, "--batch-size", 4, "--out", out_dir, "--sampler-steps", 2,
                             "--method", method, "--lr", 1e-2)
    assert code == 0, err
    trained = json.loads(out.strip().splitlines()[-1])
    assert (out_dir / "adapter" / "adapter.safetensors").is_file()
    code, out, err = run_cli(capsys, "eval", "--adapter", out_dir / "adapter", "--task", "csv",
                             "--train-file", reviews, "--steps", 2)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("task", "method", "n_eval", "accuracy", "verbalizer_accuracy"):
        assert key in result
    assert result["method"] == method and result["n_eval"] == 3
    assert result["accuracy"] == trained["accuracy"]  # the saved adapter reproduces the end of training


def test_a_mismatched_base_is_refused(capsys, tmp_path, reviews, tiny_base_dir):
    from lora_diffusion.backbone import tiny_backbone

    out_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "--base", tiny_base_dir, "--task", "csv", "--train-file", reviews,
                   "--steps", 1, "--batch-size", 2, "--out", out_dir, "--sampler-steps", 1)[0] == 0
    other = tmp_path / "other_base"
    tiny_backbone(seed=1).mlm.save_pretrained(other)
    tiny_backbone(seed=1).tokenizer.save_pretrained(other)
    code, out, err = run_cli(capsys, "eval", "--adapter", out_dir, "--base", other, "--task", "csv",
                             "--train-file", reviews)
    assert code == 2 and "was trained on a base with fingerprint" in err


def test_sample_from_all_masks(capsys, tiny_base_dir):
    code, out, err = run_cli(capsys, "sample", "--base", tiny_base_dir, "--length", 6, "--steps", 3,
                             "--n", 2, "--temperature", 1.0)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(lines) and "[MASK]" not in out
