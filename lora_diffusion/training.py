"""The training loop: one loop for every method, for task fine-tuning and for preparing the base.

AdamW, linear warmup then cosine decay, gradient accumulation and clipping, optional
bf16 autocast, periodic held-out evaluation, a JSONL metrics log, and atomic
checkpoints (safetensors + JSON) from which a killed run resumes exactly: the batch
and the noise of every step are functions of (seed, step), so a resumed run sees the
same data it would have seen. The loop does steps; what a run is (data, evaluation,
saving the adapter) is `runs.py`'s business.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import DiffusionLM, diffusion_loss
from .files import append_jsonl, load_tensors, read_json, read_jsonl, save_tensors, write_json, write_jsonl
from .methods import Method


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1          # micro-batches per optimiser step
    lr: float | None = None      # None: the method's default
    weight_decay: float = 0.0
    warmup: float = 0.06         # fraction of steps
    clip: float = 1.0            # max grad norm (0 = off)
    seed: int = 0
    bf16: bool = False           # bf16 autocast (GPU, and CPUs that support it)
    eval_every: int = 0          # 0: evaluate only at the end
    checkpoint_every: int = 100  # 0: no checkpoints
    log_every: int = 10
    device: str = "auto"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The noise of step `step` depends only on (seed, step, micro): resumable and reproducible."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro)


def make_optimizer(method: Method, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the method's trainable parameters; no weight decay on vectors (biases, norms)."""
    params = method.trainable_parameters()
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def train_step(model: DiffusionLM, method: Method, optimizer, params: list, micro_batches: list[dict],
               generators: list, lr: float, clip: float = 1.0, bf16: bool = False, loss_fn=diffusion_loss) -> dict:
    """One optimiser step over gradient-accumulated micro-batches (already on the model's device).

    `params` are the method's trainable parameters, in its order (the gradient norm is
    clipped over them). Returns the step's diffusion loss (what is reported), the method's
    penalty and the gradient norm before clipping.
    """
    device_type = next(model.parameters()).device.type
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = step_penalty = 0.0
    for batch, generator in zip(micro_batches, generators):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, **batch, generator=generator)
            penalty = method.regularization()  # the method's regularisers, if it has any
        total = loss if penalty is None else loss + penalty
        (total / len(micro_batches)).backward()
        step_loss += loss.item() / len(micro_batches)
        step_penalty += (0.0 if penalty is None else penalty.item()) / len(micro_batches)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(lr)
    return {"loss": step_loss, "penalty": step_penalty, "grad_norm": float(grad_norm)}


# ---------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-N/{trainable,optimizer}.safetensors + state.json,
# with out/checkpoints/latest.json pointing at the newest complete one.
# ---------------------------------------------------------------------------------------

def save_checkpoint(folder: Path, step: int, method: Method, optimizer, config: TrainConfig) -> None:
    ckpt = folder / f"step-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_tensors(ckpt / "trainable.safetensors", method.state_dict())
    opt_state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
               for idx, state in opt_state["state"].items() for key, value in state.items()}
    save_tensors(ckpt / "optimizer.safetensors", tensors)
    write_json(ckpt / "state.json", {"step": step, "config": asdict(config),
                                     "param_groups": opt_state["param_groups"]})
    write_json(folder / "latest.json", {"step": step, "path": ckpt.name})  # the commit point
    for old in folder.glob("step-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, method: Method, optimizer) -> int:
    latest = read_json(folder / "latest.json")
    ckpt = folder / latest["path"]
    method.load_state_dict(load_tensors(ckpt / "trainable.safetensors"))
    state: dict = {}
    for key, value in load_tensors(ckpt / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = read_json(ckpt / "state.json")["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(latest["step"])


class RunFolder:
    """A run's metrics log and checkpoints (or nothing, without an output folder)."""

    def __init__(self, out_dir=None, on_log: Callable[[dict], None] | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_log = on_log
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out_dir / "metrics.jsonl" if self.out_dir else None
        self.checkpoints = self.out_dir / "checkpoints" if self.out_dir else None

    def resume(self, method: Method, optimizer) -> int:
        """The step to start from: that of the last checkpoint (its state loaded), else 0."""
        if self.checkpoints is None:
            return 0
        if not (self.checkpoints / "latest.json").is_file():
            if self.metrics.exists():
                self.metrics.unlink()
            return 0
        start = load_checkpoint(self.checkpoints, method, optimizer)
        # Drop log lines written after the checkpoint: they will be written again.
        write_jsonl(self.metrics, [r for r in read_jsonl(self.metrics) if r.get("step", 0) <= start])
        return start

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            append_jsonl(self.metrics, record)
        if self.on_log is not None:
            self.on_log(record)

    def records(self) -> list[dict]:
        return read_jsonl(self.metrics) if self.metrics else []


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def train(model: DiffusionLM, method: Method, batch_for_step: Callable[[int, int], dict],
          config: TrainConfig, out_dir=None, evaluate: Callable[[DiffusionLM], dict] | None = None,
          loss_fn=diffusion_loss, on_log: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, progress: bool = True) -> dict:
    """Train `method` (already attached to `model`) and return a summary.

    `batch_for_step(step, micro)` gives the micro-batch `micro` of optimiser step `step`.
    With `out_dir`, metrics go to `out_dir/metrics.jsonl` and checkpoints to
    `out_dir/checkpoints/`; an existing checkpoint there is resumed from.
    """
    device = pick_device(config.device)
    model.to(device)
    lr = config.lr or method.default_lr
    params = list(method.trainable_parameters().values())
    optimizer = make_optimizer(method, lr, config.weight_decay)
    run = RunFolder(out_dir, on_log)
    start = run.resume(method, optimizer)
    model.train()
    window: list[dict] = []  # the steps since the last log line
    stopped = False
    # In a log file (not a terminal) a bar line every 10 s is enough.
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="train", unit="step",
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    step = start
    for step in range(start, config.steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        began = time.perf_counter()
        micro = range(config.grad_accum)
        stats = train_step(model, method, optimizer, params,
                           [_to(batch_for_step(step, m), device) for m in micro],
                           [step_generator(config.seed, step, m) for m in micro],
                           lr * lr_factor(step, config.steps, config.warmup), config.clip, config.bf16, loss_fn)
        window = (window + [{**stats, "seconds": time.perf_counter() - began}])[-config.log_every:]
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        _after_step(step + 1, config, window, optimizer, run, model, method, evaluate)
    bar.close()
    model.eval()
    final_step = step if stopped else config.steps
    summary = {"steps": final_step, "stopped_early": stopped, "resumed_from_step": start, "lr": lr,
               "device": str(device), **summarize(run.records(), window)}
    if evaluate is not None:
        summary["eval"] = evaluate(model)
        run.log({"step": final_step, **{f"eval_{k}": v for k, v in summary["eval"].items()}})
    if run.checkpoints is not None and config.checkpoint_every and not stopped and start < config.steps:
        save_checkpoint(run.checkpoints, final_step, method, optimizer, config)
    return summary


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _after_step(done: int, config: TrainConfig, window: list[dict], optimizer, run: RunFolder, model, method,
                evaluate) -> None:
    """The log line, the periodic held-out check and the checkpoint due after step `done`."""
    if done % config.log_every == 0 or done == config.steps:
        record = {"step": done, "loss": sum(w["loss"] for w in window) / len(window),
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": window[-1]["grad_norm"],
                  "sec_per_step": sum(w["seconds"] for w in window) / len(window)}
        if any(w["penalty"] for w in window):
            record["penalty"] = sum(w["penalty"] for w in window) / len(window)
        run.log(record)
    if evaluate is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
        model.eval()
        run.log({"step": done, **{f"eval_{k}": v for k, v in evaluate(model).items()}})
        model.train()
    if run.checkpoints is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
        save_checkpoint(run.checkpoints, done, method, optimizer, config)


def summarize(records: list[dict], window: list[dict]) -> dict:
    """Final train loss, median step time and logged training time of a run.

    From the log when there is one: with a resume it covers the whole run, not just this
    process (a finished run started again must not report zero steps' stats). Without a
    log, from the last steps of this process.
    """
    logged = [r for r in records if "loss" in r and "sec_per_step" in r]
    if logged:
        times = sorted(r["sec_per_step"] for r in logged)
        seconds = sum(r["sec_per_step"] * (r["step"] - prev["step"])
                      for prev, r in zip([{"step": 0}] + logged, logged))
        return {"final_train_loss": logged[-1]["loss"], "sec_per_step": times[len(times) // 2],
                "logged_train_seconds": round(seconds, 3)}
    times = sorted(w["seconds"] for w in window)
    return {"final_train_loss": sum(w["loss"] for w in window) / len(window) if window else None,
            "sec_per_step": times[len(times) // 2] if times else None}
