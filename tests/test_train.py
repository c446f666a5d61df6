"""The training loop: schedule, metrics log, atomic checkpoints and exact resume."""

import pytest
import torch

from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import batch_schedule, collate, encode, load_task
from lora_diffusion.diffusion import DiffusionLM
from lora_diffusion.files import read_json, read_jsonl
from lora_diffusion.methods import FullFineTune
from lora_diffusion.training import TrainConfig, lr_factor, train


def test_lr_warmup_then_cosine_to_zero():
    factors = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.01


def _setup(tmp_path, name):
    backbone = tiny_backbone(seed=0, hidden=16, layers=1)
    model = DiffusionLM(backbone)
    method = FullFineTune()
    method.attach(model)
    task = load_task("suite_topic", max_train=64)
    enc = encode(backbone.tokenizer, task.train, 2, 96)
    order = batch_schedule(len(enc.prompts), 8, seed=0)
    batch_for_step = lambda step, micro: collate(enc, order(step), backbone.pad_id)
    return model, method, batch_for_step, tmp_path / name


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    config = TrainConfig(steps=6, batch_size=8, lr=1e-3, checkpoint_every=3, log_every=1, eval_every=0)

    model, method, batches, out = _setup(tmp_path, "straight")
    train(model, method, batches, config, out_dir=out, progress=False)
    straight = {k: v.clone() for k, v in method.state_dict().items()}

    model, method, batches, out = _setup(tmp_path, "killed")
    calls = {"n": 0}

    def stop_after_four():  # the "kill": the run ends after step 4, its checkpoint is at step 3
        calls["n"] += 1
        return calls["n"] > 4

    summary = train(model, method, batches, config, out_dir=out, should_stop=stop_after_four, progress=False)
    assert summary["stopped_early"] and read_json(out / "checkpoints" / "latest.json")["step"] == 3
    assert len(read_jsonl(out / "metrics.jsonl")) == 4

    model, method, batches, out = _setup(tmp_path, "killed")  # a fresh process picks the run up
    summary = train(model, method, batches, config, out_dir=out, progress=False)
    assert summary["steps"] == 6
    for name, tensor in straight.items():
        assert torch.allclose(method.state_dict()[name], tensor, atol=1e-6), name
    steps_logged = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps_logged == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were replaced, not duplicated
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-6"]
    assert not list(out.rglob("*.tmp"))


def test_a_finished_run_started_again_reports_the_whole_runs_stats(tmp_path):
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, checkpoint_every=2, log_every=1, eval_every=0)
    model, method, batches, out = _setup(tmp_path, "run")
    first = train(model, method, batches, config, out_dir=out, progress=False)
    model, method, batches, out = _setup(tmp_path, "run")  # e.g. the same command run once more
    again = train(model, method, batches, config, out_dir=out, progress=False)
    assert again["resumed_from_step"] == 4 and again["steps"] == 4
    assert again["final_train_loss"] == first["final_train_loss"] is not None
    assert again["sec_per_step"] == first["sec_per_step"] > 0
    assert again["logged_train_seconds"] == first["logged_train_seconds"] > 0
