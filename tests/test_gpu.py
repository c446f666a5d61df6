"""The GPU path: training with bf16, TF32, fused AdamW and torch.compile, exact resume with
CUDA's generators, every method on the device, and the bench's MFU. Skipped without CUDA;
`scripts/gpu_check.sh` runs them (with the bench) on a GPU in a few minutes."""

import pytest
import torch

from lora_diffusion.adapters import load_adapter
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import load_task
from lora_diffusion.diffusion import DiffusionLM
from lora_diffusion.files import load_tensors
from lora_diffusion.methods import METHODS, make_method
from lora_diffusion.runs import fine_tune
from lora_diffusion.training import TrainConfig, make_optimizer
from test_cli import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def short_run(out, method="lora_diffusion", steps=4, should_stop=None, **config):
    task = load_task("suite_topic", max_train=40, max_eval=8)
    return fine_tune(tiny_backbone(seed=0), task, make_method(method), out_dir=out, sampler_steps=2,
                     config=TrainConfig(steps=steps, batch_size=4, checkpoint_every=2, device="cuda", **config),
                     monitor_examples=0, progress=False, should_stop=should_stop)


def test_training_with_bf16_tf32_and_compile_runs_on_the_gpu_with_fused_adamw(tmp_path):
    result = short_run(tmp_path / "run", bf16=True, tf32=True, compile=True)
    assert result["train"]["device"].startswith("cuda") and result["train"]["steps"] == 4
    model = DiffusionLM(tiny_backbone(seed=0)).to("cuda")
    method = make_method("lora")
    method.attach(model)
    assert make_optimizer(method, 1e-3).defaults["fused"] is True


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_on_the_gpu_and_reloads_to_the_same_logits(name, tmp_path):
    result = short_run(tmp_path / "run", method=name, steps=2)
    reloaded, _, _ = load_adapter(tmp_path / "run", base=tiny_backbone(seed=0))
    reloaded.to("cuda")
    ids = torch.full((2, 12), 2000, device="cuda")
    ids[:, 0] = reloaded.backbone.cls_id
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, 8:] = True
    t = torch.full((2,), 0.5, device="cuda")
    with torch.no_grad():
        expected = result["model"](ids, torch.ones_like(ids), t, ids[:, 1:3], positions=positions)
        got = reloaded(ids, torch.ones_like(ids), t, ids[:, 1:3], positions=positions)
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_stopped_gpu_run_resumes_to_the_adapter_of_an_unstopped_one(tmp_path):
    short_run(tmp_path / "whole", steps=6)
    calls = []
    short_run(tmp_path / "halves", steps=6, should_stop=lambda: len(calls.append(1) or calls) > 3)  # after 3 steps
    resumed = short_run(tmp_path / "halves", steps=6)
    assert resumed["train"]["resumed_from_step"] == 2  # the checkpoint before the stop
    whole = load_tensors(tmp_path / "whole" / "adapter" / "adapter.safetensors")
    halves = load_tensors(tmp_path / "halves" / "adapter" / "adapter.safetensors")
    for key in whole:
        assert torch.allclose(whole[key].float(), halves[key].float(), atol=1e-6), key


def test_bench_on_the_gpu_reports_an_mfu(capsys, tmp_path, tiny_base_dir):
    code, _, err = run_cli(capsys, "bench", "--base", str(tiny_base_dir), "--methods", "lora", "--device", "cuda",
                           "--bf16", "--tf32", "--steps", "3", "--warmup", "1", "--out", str(tmp_path / "b.json"))
    assert code == 0, err
    import json

    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["device"].startswith("cuda") and row["peak_memory_bytes"] > 0
    if row["peak_flops_per_s"] is not None:  # a GPU of PEAK_FLOPS
        assert 0 < row["mfu"] < 1
