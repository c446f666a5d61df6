"""Hardened training: exact resume after a kill at any moment, config validation, divergence.

The resume tests run `lora-diffusion train` in child processes that kill themselves at
chosen moments (SIGKILL, or SIGINT for Ctrl-C), resume each run to completion and compare
it with an uninterrupted run: the same adapter tensors bit for bit, the same held-out
metrics, the same metrics log without a doubled line. Importing torch and transformers
takes seconds, so the children are forked from one `forkserver` process that imports
them once; every child is still a separate process that a SIGKILL ends on the spot.
"""

import math
import multiprocessing
import shutil
import signal

import pytest
import torch

from lora_diffusion.adapters import RUN_ADAPTER, TENSORS_FILE
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import batch_schedule, collate, encode, load_task
from lora_diffusion.diffusion import DiffusionLM, diffusion_loss
from lora_diffusion.errors import UserError
from lora_diffusion.files import load_tensors, read_json, read_jsonl
from lora_diffusion.methods import FullFineTune
from lora_diffusion.training import TrainConfig, train

# The child: optionally trap the Nth call of a library function (send `sig` to itself just
# before it runs), then run the CLI. The CLI has no --log-every: every step is logged here,
# so every step's loss is compared.
CHILD = """
import functools, os, sys
from lora_diffusion import cli, runs, training

training.TrainConfig = functools.partial(training.TrainConfig, log_every=1)
if TRAP:
    module, name, nth, sig = TRAP
    owner = {"training": training, "runs": runs}[module]
    real, calls = getattr(owner, name), []

    def trapped(*args, **kwargs):
        calls.append(name)
        if len(calls) == nth:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    setattr(owner, name, trapped)
sys.exit(cli.main(ARGV))
"""

# 8 steps, a checkpoint every 2, a held-out check at step 4. LoRA's dropout draws from
# torch's global generator: without it in the checkpoint a resumed run would differ.
# Per checkpoint `save_tensors` is called 3 times (trainable, optimizer, rng); `evaluate_task`
# runs at step 4, at the end of training (the monitor) and on the held-out split.
STEPS = 8
KILLS = {
    "mid_checkpoint_write": ("training", "save_tensors", 5, signal.SIGKILL),   # step 4: trainable only
    "between_checkpoints": ("training", "train_step", 6, signal.SIGKILL),      # after step 5's log line
    "final_evaluation": ("runs", "evaluate_task", 2, signal.SIGKILL),          # the monitor at the end
    "final_checkpoint": ("training", "save_tensors", 11, signal.SIGKILL),      # after the final eval line
    "heldout_evaluation": ("runs", "evaluate_task", 3, signal.SIGKILL),        # training finished
}


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lora_diffusion.cli", "lora_diffusion.runs", "lora_diffusion.methods"])
    return context


def _train(forkserver, base, out, trap=None) -> int:
    """`lora-diffusion train` into `out` in a child process; its exit code (-9: SIGKILL)."""
    argv = ["train", "--base", str(base), "--task", "suite_sentiment", "--method", "lora",
            "--option", "dropout=0.1", "--option", "r=4", "--steps", str(STEPS), "--batch-size", "8",
            "--checkpoint-every", "2", "--eval-every", "4", "--max-train-examples", "64",
            "--max-eval-examples", "16", "--sampler-steps", "2", "--threads", "1", "--out", str(out)]
    child = forkserver.Process(target=exec, args=(CHILD, {"ARGV": argv, "TRAP": trap}))
    child.start()
    child.join(timeout=120)
    if child.is_alive():  # a hung child fails the test instead of outliving it
        child.kill()
        child.join()
    return child.exitcode


def _run(out) -> dict:
    """What a finished run folder holds, timing fields left out."""
    adapter = load_tensors(out / RUN_ADAPTER / TENSORS_FILE)
    results = read_json(out / "results.json")
    log = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in read_jsonl(out / "metrics.jsonl")]
    return {"adapter": adapter, "results": results, "log": log}


def _assert_same(resumed: dict, straight: dict) -> None:
    assert resumed["adapter"].keys() == straight["adapter"].keys()
    for name, tensor in straight["adapter"].items():
        assert torch.equal(resumed["adapter"][name], tensor), name
    # Held-out metrics, predictions, config: all equal. Of the train summary, times and
    # resumed_from_step differ.
    assert ({k: v for k, v in resumed["results"].items() if k != "train"}
            == {k: v for k, v in straight["results"].items() if k != "train"})
    assert resumed["results"]["train"]["final_train_loss"] == straight["results"]["train"]["final_train_loss"]
    assert resumed["log"] == straight["log"]


@pytest.fixture(scope="module")
def straight_folder(forkserver, tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert _train(forkserver, tiny_base_dir, out) == 0
    return out


@pytest.fixture(scope="module")
def straight(straight_folder):
    """The uninterrupted run every interrupted one must match."""
    run = _run(straight_folder)
    steps = [r["step"] for r in run["log"] if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    evals = [r["step"] for r in run["log"] if "eval_monitor_accuracy" in r]
    assert evals == [4, STEPS]
    assert run["results"]["train"]["train_seconds"] > 0
    return run


@pytest.mark.parametrize("moment", KILLS)
def test_a_run_killed_and_resumed_ends_as_an_uninterrupted_one(forkserver, tiny_base_dir, tmp_path, straight,
                                                               moment):
    out = tmp_path / "run"
    assert _train(forkserver, tiny_base_dir, out, trap=KILLS[moment]) == -signal.SIGKILL
    latest = read_json(out / "checkpoints" / "latest.json")
    earlier_seconds = read_json(out / "checkpoints" / latest["path"] / "state.json")["seconds"]
    assert _train(forkserver, tiny_base_dir, out) == 0
    resumed = _run(out)
    _assert_same(resumed, straight)
    train_summary = resumed["results"]["train"]
    assert train_summary["train_seconds"] >= earlier_seconds > 0  # the killed process's time is in the total
    assert train_summary["resumed_from_step"] == latest["step"] == {"mid_checkpoint_write": 2, "between_checkpoints": 4,
                                                  "final_evaluation": 6, "final_checkpoint": 6,
                                                  "heldout_evaluation": STEPS}[moment]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", f"step-{STEPS}"]


def test_ctrl_c_exits_130_and_the_run_resumes(forkserver, tiny_base_dir, tmp_path, straight):
    out = tmp_path / "run"
    assert _train(forkserver, tiny_base_dir, out, trap=("training", "train_step", 7, signal.SIGINT)) == 130
    assert read_json(out / "checkpoints" / "latest.json")["step"] == 6
    assert _train(forkserver, tiny_base_dir, out) == 0
    _assert_same(_run(out), straight)


def test_a_finished_run_started_again_is_not_trained_again(forkserver, tiny_base_dir, tmp_path, straight_folder,
                                                           straight):
    out = shutil.copytree(straight_folder, tmp_path / "run")
    first = read_json(out / "results.json")["train"]
    assert _train(forkserver, tiny_base_dir, out) == 0
    again = _run(out)
    _assert_same(again, straight)
    assert again["results"]["train"]["resumed_from_step"] == STEPS
    assert again["results"]["train"]["train_seconds"] == first["train_seconds"]


def _setup():
    backbone = tiny_backbone(seed=0, hidden=16, layers=1)
    model = DiffusionLM(backbone)
    method = FullFineTune()
    method.attach(model)
    enc = encode(backbone.tokenizer, load_task("suite_topic", max_train=32).train, 2, 96)
    order = batch_schedule(len(enc.prompts), 8, seed=0)
    return model, method, lambda step, micro: collate(enc, order(step), backbone.pad_id)


def _in_process(out, should_stop=None) -> tuple[dict, list[dict]]:
    """A run of the loop itself: a log line every 3 steps, so one spans a checkpoint (every 2)."""
    model, method, batches = _setup()
    config = TrainConfig(steps=8, batch_size=8, lr=1e-3, checkpoint_every=2, log_every=3, eval_every=4)
    evaluate = lambda m: {"weight_norm": float(sum(t.norm() for t in method.state_dict().values()))}
    summary = train(model, method, batches, config, out_dir=out, evaluate=evaluate, should_stop=should_stop,
                    progress=False)
    log = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in read_jsonl(out / "metrics.jsonl")]
    return summary, log


def test_a_stopped_run_resumes_without_its_stop_lines_and_with_its_log_window(tmp_path):
    _, straight = _in_process(tmp_path / "straight")
    calls = []
    stopped, log = _in_process(tmp_path / "run", should_stop=lambda: calls.append(1) or len(calls) > 4)
    assert stopped["stopped_early"] and [r["step"] for r in log] == [3, 4, 4]  # the stop evaluated at step 4 too
    resumed, log = _in_process(tmp_path / "run")
    assert resumed["resumed_from_step"] == 4 and log == straight


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"seed": 1}, {"steps": 12}, {"batch_size": 4}])
def test_resuming_with_other_settings_is_refused(tmp_path, change):
    """A checkpoint resumed under another lr, seed or schedule would be neither run: say so."""
    model, method, batches = _setup()
    settings = dict(steps=8, batch_size=8, lr=1e-3, checkpoint_every=2)
    train(model, method, batches, TrainConfig(**settings), out_dir=tmp_path, should_stop=lambda: False,
          progress=False)
    model, method, batches = _setup()
    name = next(iter(change))
    with pytest.raises(UserError, match=f"holds a run with {name}=.*resume it with the same settings"):
        train(model, method, batches, TrainConfig(**{**settings, **change}), out_dir=tmp_path, progress=False)


def test_a_checkpoint_of_another_process_count_is_refused_and_an_older_one_still_resumes(tmp_path):
    """Another number of processes deals other batches; a checkpoint written before the process
    count (and tf32) were recorded had one process and tf32 off, so it resumes."""
    from lora_diffusion.training import _check_same_run

    config = TrainConfig(steps=8, batch_size=8)
    saved = {"config": {k: v for k, v in vars(config).items() if k != "tf32"},
             "identity": {"method": "lora", "processes": 2}}
    with pytest.raises(UserError, match="holds a run with processes=2"):
        _check_same_run(tmp_path, saved, config, {"method": "lora", "processes": 1})
    older = {"config": saved["config"], "identity": {"method": "lora"}}
    _check_same_run(tmp_path, older, config, {"method": "lora", "processes": 1})  # no error


def test_more_micro_batches_per_step_than_the_noise_seeds_separate_are_refused(tmp_path):
    model, method, batches = _setup()
    with pytest.raises(UserError, match="at most 101 micro-batches per step"):
        train(model, method, batches, TrainConfig(steps=1, batch_size=1, grad_accum=102), progress=False)


# ---------------------------------------------------------------------------------------
# TrainConfig: bad values are refused in one place, naming the flag
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, flag", [
    ("lr", -1.0, "--lr"), ("lr", 0, "--lr"), ("lr", math.nan, "--lr"), ("lr", math.inf, "--lr"),
    ("steps", 0, "--steps"), ("steps", 2.5, "--steps"), ("batch_size", 0, "--batch-size"),
    ("grad_accum", 0, "--grad-accum"), ("log_every", 0, "--log-every"), ("eval_every", -1, "--eval-every"),
    ("checkpoint_every", -1, "--checkpoint-every"), ("warmup", math.nan, "--warmup"), ("warmup", 2, "--warmup"),
    ("weight_decay", -0.1, "--weight-decay"), ("clip", -1, "--clip"), ("clip", math.nan, "--clip"),
    ("seed", 1.5, "--seed"), ("seed", -3, "--seed"), ("seed", 2**31, "--seed"), ("device", "gpu", "--device"), ("device", "cuda:x", "--device"),
])
def test_a_bad_train_config_is_refused_naming_the_flag(field, value, flag):
    with pytest.raises(UserError, match=f"^{flag} ") as err:
        TrainConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_the_messages_say_what_is_wanted():
    with pytest.raises(UserError, match=r"^--lr must be a number > 0 and <= 10, not -1\.0$"):
        TrainConfig(lr=-1.0)
    with pytest.raises(UserError, match="auto, cpu, cuda, cuda:N or mps"):
        TrainConfig(device="gpu")


def test_a_device_this_machine_lacks_is_refused():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(UserError, match="^--device cuda: no CUDA device here; use --device cpu or auto$"):
            TrainConfig(device="cuda")
    with pytest.raises(UserError, match=f"^--device cuda:{count}: "):
        TrainConfig(device=f"cuda:{count}")


def test_good_values_pass():
    TrainConfig(lr=None, warmup=0, clip=0, eval_every=0, checkpoint_every=0, seed=0, device="cpu")
    TrainConfig(seed=2**31 - 1)  # the CLI's bound
    TrainConfig(lr=1, warmup=1.0, device="auto")


# ---------------------------------------------------------------------------------------
# A NaN loss stops the run; no NaN reaches a checkpoint
# ---------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model, method, batches = _setup()
    calls = []

    def nan_at_step_5(model, **batch):
        calls.append(1)
        loss = diffusion_loss(model, **batch)
        return loss * math.nan if len(calls) == 5 else loss

    config = TrainConfig(steps=8, batch_size=8, lr=1e-3, checkpoint_every=2, log_every=1)
    with pytest.raises(UserError, match=r"^training diverged at step 5 \(loss nan\); the last good checkpoint "
                                        r"\(step 4\) is kept to look at; start again with a lower --lr and a new --out$"):
        train(model, method, batches, config, out_dir=tmp_path, loss_fn=nan_at_step_5, progress=False)
    assert read_json(tmp_path / "checkpoints" / "latest.json")["step"] == 4
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-4"]
    saved = load_tensors(tmp_path / "checkpoints" / "step-4" / "trainable.safetensors")
    for name, tensor in method.state_dict().items():  # the NaN step was not applied
        assert torch.isfinite(tensor).all() and torch.equal(tensor, saved[name]), name
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl"))


def test_an_infinite_first_loss_stops_the_run_before_any_checkpoint(tmp_path):
    model, method, batches = _setup()
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, checkpoint_every=2)
    with pytest.raises(UserError, match=r"^training diverged at step 1 \(loss inf\); start again with a lower --lr and a new --out$"):
        train(model, method, batches, config, out_dir=tmp_path, progress=False,
              loss_fn=lambda model, **batch: diffusion_loss(model, **batch) * math.inf)
    assert not (tmp_path / "checkpoints" / "latest.json").exists()
