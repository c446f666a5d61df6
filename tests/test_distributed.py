"""One run on two CPU processes (gloo) under `accelerate launch` and `torchrun`, with DDP, FSDP
and DeepSpeed ZeRO-2.

A 2-process run deals each step's micro-batches over the processes, so it must give the
adapter of a 1-process run with twice the gradient accumulation (same global batch, same
noise) up to the order of floating-point sums, whether the processes hold whole copies
(DDP), shards (FSDP) or partitions of the optimiser (DeepSpeed); only the main process may
write; a run killed mid-way resumes. Each launch starts two Python processes (about 15 s;
DeepSpeed's first launch on a machine also builds a C++ op, about 40 s more).
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_diffusion.adapters import RUN_ADAPTER, TENSORS_FILE
from lora_diffusion.distributed import Processes
from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS
from lora_diffusion.files import load_tensors, read_json, read_jsonl
from test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Float sums in another order drift apart step by step: measured 4e-6 after 4 steps (adapter
# values up to ~2), 1.2e-5 after 40; a lost optimiser state or batch would move them by ~lr.
# (With dropout the processes draw other masks than one process would: see `distributed`.)
TOLERANCE = {4: 1e-5}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (the [deepspeed] extra)")
ENGINES = ["ddp", "fsdp", pytest.param("deepspeed", marks=needs_deepspeed)]


def common(base, out, method="lora_diffusion", steps=4, every=2):
    return ["train", "--base", str(base), "--task", "suite_topic", "--max-train-examples", "40",
            "--max-eval-examples", "8", "--steps", str(steps), "--batch-size", "4", "--sampler-steps", "2",
            "--method", method, "--eval-every", str(every), "--checkpoint-every", str(every), "--out", str(out)]


def launch(launcher: list[str], argv: list[str], **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(launcher + ["-m", "lora_diffusion", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def free_port() -> int:
    """A port no process listens on now: each launch rendezvous there, not on the shared default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launcher(engine="ddp"):
    """`accelerate launch` with the shipped config of `engine` (ddp, fsdp or deepspeed)."""
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / f"configs/accelerate/{engine}.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port())]


def torchrun_launcher():
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]


def kill_every_process_of(out: Path) -> None:
    """SIGKILL the launcher and its workers (which may sit in sessions of their own): every
    process whose command line names `out`."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # ended meanwhile


def adapter(out) -> dict:
    return load_tensors(Path(out) / RUN_ADAPTER / TENSORS_FILE)


def assert_same_adapter(a: dict, b: dict, steps: int) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=TOLERANCE[steps], rtol=0), key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_the_adapter_of_one_with_twice_the_accumulation(engine, tiny_base_dir, tmp_path,
                                                                            capsys):
    # calibrates on its first batch (every process must see the same one), and under FSDP its
    # proximal rank step and the evaluations at steps 2 and 4 gather the shards; under DeepSpeed
    # the proximal step must reach its master copy, and the checkpoints gather AdamW's moments
    method = "lora_diffusion"
    two = launch(accelerate_launcher(engine), common(tiny_base_dir, tmp_path / "two", method))
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    code, _, err = run_cli(capsys, *common(tiny_base_dir, tmp_path / "one", method), "--grad-accum", "2")
    assert code == 0, err
    assert_same_adapter(adapter(tmp_path / "two"), adapter(tmp_path / "one"), steps=4)
    # one process wrote: one results line on stdout (under DeepSpeed on a CPU accelerate's launcher
    # also prints DeepSpeed's warning that it picked the CPU there), no doubled log line, one set of files
    assert [line[:1] for line in stdout.strip().splitlines() if "real_accelerator.py" not in line] == ["{"]
    assert stderr.count("adapter: ") == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl")] == [2, 4, 4]
    results = read_json(tmp_path / "two" / "results.json")
    assert results["train"]["processes"] == 2 and results["train"]["global_batch"] == 8
    assert results["train"]["engine"] == engine
    whole = read_json(tmp_path / "one" / "results.json")["train"]["parameter_bytes_held"]
    held = results["train"]["parameter_bytes_held"]
    assert held == whole if engine != "fsdp" else whole / 2 <= held < 0.55 * whole  # a shard: about half
    if engine == "deepspeed":  # half of AdamW's two moments and half of an fp32 master copy (+ padding)
        floats = 4 * results["trainable_parameters"]
        assert 1.5 * floats <= results["train"]["optimizer_bytes_held"] < 1.51 * floats
    assert results["accuracy"] == read_json(tmp_path / "one" / "results.json")["accuracy"]
    assert read_json(tmp_path / "one" / "results.json")["train"]["global_batch"] == 8
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "checkpoints", "metrics.jsonl",
                                                                     "results.json"]


@pytest.fixture(scope="module")
def dropout_base_dir(tmp_path_factory, tiny):
    """The tiny base with dropout 0.1, as real bases have: masks drawn per micro-batch must resume."""
    folder = tmp_path_factory.mktemp("dropout_base")
    tiny.mlm.config.hidden_dropout_prob = tiny.mlm.config.attention_probs_dropout_prob = 0.1
    try:
        tiny.mlm.save_pretrained(folder)
    finally:
        tiny.mlm.config.hidden_dropout_prob = tiny.mlm.config.attention_probs_dropout_prob = 0.0
    tiny.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers to kill through /proc (Linux)")
@pytest.mark.parametrize("launcher, method", [
    (torchrun_launcher, "lora_diffusion"), (lambda: accelerate_launcher("fsdp"), "lora"),
    pytest.param(lambda: accelerate_launcher("deepspeed"), "lora_diffusion", marks=needs_deepspeed)],
    ids=["ddp", "fsdp", "deepspeed"])
def test_a_killed_two_process_run_resumes_to_the_adapter_of_an_uninterrupted_one(launcher, method, dropout_base_dir,
                                                                                  tmp_path):
    """Under FSDP (weight LoRA: its matrices live in the base's blocks, so they are sharded) the
    checkpoint holds the gathered optimiser state; each process cuts its shard back out. Under
    DeepSpeed (LoRA-Diffusion: two parameter groups, a proximal step) each process puts its
    partition of the moments back and the loaded adapter into DeepSpeed's master copy."""
    whole = launch(launcher(), common(dropout_base_dir, tmp_path / "whole", method, steps=40, every=10))
    _, stderr = whole.communicate(timeout=300)
    assert whole.returncode == 0, stderr[-3000:]
    argv = common(dropout_base_dir, tmp_path / "two", method, steps=40, every=10)
    first = launch(launcher(), argv)
    latest = tmp_path / "two" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while not latest.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_every_process_of(tmp_path / "two")  # the launcher and both workers, mid-run
    first.communicate()
    assert not (tmp_path / "two" / "results.json").exists(), "finished before the kill: nothing was resumed"
    second = launch(launcher(), argv)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    results = read_json(tmp_path / "two" / "results.json")
    assert results["train"]["resumed_from_step"] > 0
    resumed, uninterrupted = adapter(tmp_path / "two"), adapter(tmp_path / "whole")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    steps = [r["step"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))  # no line written twice, by two processes or by the resume


def test_compare_on_two_processes_writes_one_table_of_the_same_runs(tiny_base_dir, tmp_path, capsys):
    """Weight LoRA (through peft) under torchrun: each run's adapter as with one process, one table
    (with its memory column: the main process profiles in a child of one process)."""
    argv = ["compare", "--base", str(tiny_base_dir), "--task", "suite_topic", "--methods", "lora", "--seed", "0",
            "--steps", "2", "--batch-size", "4", "--max-train-examples", "40", "--max-eval-examples", "8",
            "--sampler-steps", "2"]
    two = launch(torchrun_launcher(), argv + ["--out", str(tmp_path / "two")])
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    assert stdout.count("| lora |") == 1  # one process printed the table
    code, _, err = run_cli(capsys, *argv, "--grad-accum", "2", "--out", tmp_path / "one")
    assert code == 0, err
    assert_same_adapter(adapter(tmp_path / "two" / "lora" / "seed-0"), adapter(tmp_path / "one" / "lora" / "seed-0"),
                        steps=4)
    row = read_json(tmp_path / "two" / "results.json")["rows"][0]
    assert row["label"] == "lora" and row["profile"]["peak_memory_bytes"] > 0


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_every_method_trains_under_fsdp_and_deepspeed_the_adapter_it_trains_on_one_process(engine, tiny_base_dir,
                                                                                           tmp_path, capsys):
    """FSDP: every parameter sharded, the frozen base's too. DeepSpeed: the trained ones' optimiser
    state partitioned. Each method's adapter and held-out score as on one process with the same
    global batch."""
    methods = list(METHODS)
    # 2 examples a process: a step often leaves a phase of the step-aware methods unused on one
    # process, or on both (under FSDP those modules must then keep no gradient, as on one
    # process; under DeepSpeed every module runs at each step, on no rows where none is its.
    # DeepSpeed's AdamW then steps a phase no example of a whole step used, where one process
    # would not (see `zero`); with these seeds the adapters still match: a phase first used
    # after step 1, or missing from a step after its first use, would move them apart by ~lr)
    argv = ["compare", "--base", str(tiny_base_dir), "--task", "suite_topic", "--methods", ",".join(methods),
            "--seed", "0", "--steps", "3", "--batch-size", "2", "--max-train-examples", "40",
            "--max-eval-examples", "8", "--sampler-steps", "2", "--no-profile"]
    two = launch(accelerate_launcher(engine), argv + ["--out", str(tmp_path / "two")])
    _, stderr = two.communicate(timeout=600)
    assert two.returncode == 0, stderr[-3000:]
    code, _, err = run_cli(capsys, *argv, "--grad-accum", "2", "--out", tmp_path / "one")
    assert code == 0, err
    for method in methods:
        run_two, run_one = (tmp_path / side / method / "seed-0" for side in ("two", "one"))
        assert_same_adapter(adapter(run_two), adapter(run_one), steps=4)
        two_results, one_results = read_json(run_two / "results.json"), read_json(run_one / "results.json")
        assert two_results["train"]["engine"] == engine, method
        assert two_results["verbalizer_accuracy"] == one_results["verbalizer_accuracy"], method


def test_fsdp_refuses_the_base_cache(tiny_base_dir, tmp_path):
    argv = common(tiny_base_dir, tmp_path / "two", "lora_diffusion") + ["--option", "injection=final",
                                                                       "--cache-base"]
    two = launch(accelerate_launcher("fsdp"), argv)
    _, stderr = two.communicate(timeout=300)
    assert two.returncode != 0 and "under FSDP, --cache-base and --compile are not offered" in stderr
    assert not (tmp_path / "two" / "checkpoints").exists()


@pytest.mark.parametrize("env, refusal", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3 is not offered"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
     "offloading is not offered"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "config file is not read"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2")])
def test_engines_not_offered_are_refused_before_any_process_group(env, refusal, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=refusal):
        Processes()


def test_commands_other_than_train_and_compare_refuse_to_run_on_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "sample", "--prompt", "hello", "--steps", "1")
    assert code == 2 and "only train and compare are offered" in err


def test_compare_refuses_jobs_on_several_processes(monkeypatch, tiny_base_dir, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(capsys, "compare", "--base", tiny_base_dir, "--task", "suite_topic", "--methods", "lora",
                           "--jobs", "2", "--out", tmp_path / "cmp")
    assert code == 2 and "leave --jobs at 1" in err


def test_under_deepspeed_lora_diffusion_runs_every_phase_on_every_process(tiny_model):
    """ZeRO-2 reduces gradients in the order they arrive: with every module run at each step (on
    no rows where none is its phase), every parameter gets a gradient, zero where it did not
    act, and the loss is the one each phase's own modules give."""
    from lora_diffusion.diffusion import diffusion_loss
    from lora_diffusion.methods import make_method

    method = make_method("lora_diffusion")
    method.attach(tiny_model)
    batch = {"input_ids": torch.randint(5, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "response_mask": torch.ones(2, 8, dtype=torch.bool)}
    t = torch.tensor([0.9, 0.95])  # both rows early (phase 0): the other two phases have no row

    def loss_and_grads():
        tiny_model.zero_grad(set_to_none=True)
        loss = diffusion_loss(tiny_model, **batch, t=t, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in method.trainable_parameters().items()}

    loss, grads = loss_and_grads()
    unused = {n for n, g in grads.items() if g is None}
    assert any(".phases.1." in n and ".down." in n for n in unused)  # a phase without rows: no gradient
    method.every_parameter_each_step = True
    every_loss, every_grads = loss_and_grads()
    assert torch.equal(loss, every_loss)
    # only the instruction gates stay without one (no instruction here): unused on every process alike
    assert {n for n, g in every_grads.items() if g is None} == {n for n in unused if ".gate." in n}
    for name, grad in every_grads.items():
        if grad is not None:
            expected = grads[name] if grads[name] is not None else torch.zeros_like(grad)
            assert torch.allclose(grad, expected, atol=1e-7), name
