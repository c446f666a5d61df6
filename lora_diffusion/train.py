"""The training loop: one loop for every method, for task fine-tuning and for preparing the base.

AdamW, linear warmup then cosine decay, gradient accumulation and clipping, optional
bf16 autocast, periodic held-out evaluation, a JSONL metrics log, and atomic
checkpoints (safetensors + JSON) from which a killed run resumes exactly: the batch
and the noise of every step are functions of (seed, step), so a resumed run sees the
same data it would have seen.
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
from .io import append_jsonl, load_tensors, read_json, read_jsonl, save_tensors, write_json
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


# ---------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-N/{trainable,optimizer}.safetensors + state.json,
# with out/checkpoints/latest.json pointing at the newest complete one.
# ---------------------------------------------------------------------------------------

def _save_checkpoint(folder: Path, step: int, method: Method, optimizer, config: TrainConfig) -> None:
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


def _load_checkpoint(folder: Path, method: Method, optimizer) -> int:
    latest = read_json(folder / "latest.json")
    ckpt = folder / latest["path"]
    method.load_state_dict(load_tensors(ckpt / "trainable.safetensors"))
    flat = load_tensors(ckpt / "optimizer.safetensors")
    state: dict = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = read_json(ckpt / "state.json")["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(latest["step"])


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
    params = method.trainable_parameters()
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    lr = config.lr or method.default_lr
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    start = 0
    metrics_path = ckpt_dir = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path, ckpt_dir = out_dir / "metrics.jsonl", out_dir / "checkpoints"
        if (ckpt_dir / "latest.json").is_file():
            start = _load_checkpoint(ckpt_dir, method, optimizer)
            # Drop log lines written after the checkpoint: they will be written again.
            kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= start]
            metrics_path.write_text("".join(__import__("json").dumps(r) + "\n" for r in kept))
        elif metrics_path.exists():
            metrics_path.unlink()

    def log(record: dict) -> None:
        if metrics_path is not None:
            append_jsonl(metrics_path, record)
        if on_log is not None:
            on_log(record)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    model.train()
    recent_losses: list[float] = []
    recent_penalties: list[float] = []
    step_times: list[float] = []
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
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, config.steps, config.warmup)
        step_loss = step_penalty = 0.0
        for micro in range(config.grad_accum):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_for_step(step, micro).items()}
            with autocast:
                loss = loss_fn(model, **batch, generator=step_generator(config.seed, step, micro))
                penalty = method.regularization()  # the method's regularisers, if it has any
            total = loss if penalty is None else loss + penalty
            (total / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum  # the diffusion loss alone is what we report
            step_penalty += (0.0 if penalty is None else penalty.item()) / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(optimizer.param_groups[0]["lr"])
        step_times.append(time.perf_counter() - began)
        recent_losses = (recent_losses + [step_loss])[-config.log_every:]
        recent_penalties = (recent_penalties + [step_penalty])[-config.log_every:]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            record = {"step": done, "loss": sum(recent_losses) / len(recent_losses),
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                      "sec_per_step": sum(step_times[-config.log_every:]) / len(step_times[-config.log_every:])}
            if any(recent_penalties):
                record["penalty"] = sum(recent_penalties) / len(recent_penalties)
            log(record)
        if evaluate is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
            model.eval()
            log({"step": done, **{f"eval_{k}": v for k, v in evaluate(model).items()}})
            model.train()
        if ckpt_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            _save_checkpoint(ckpt_dir, done, method, optimizer, config)
    bar.close()
    model.eval()

    final_step = step if stopped else config.steps
    summary = {"steps": final_step, "stopped_early": stopped, "resumed_from_step": start,
               "lr": lr, "device": str(device)}
    # Steps run before a resume are in the log, so with one the summary covers the whole run,
    # not just this process (a finished run started again must not report zero steps' stats).
    logged = [r for r in read_jsonl(metrics_path) if "loss" in r and "sec_per_step" in r] if metrics_path else []
    if logged:
        times = sorted(r["sec_per_step"] for r in logged)
        summary.update(final_train_loss=logged[-1]["loss"], sec_per_step=times[len(times) // 2],
                       logged_train_seconds=round(sum(r["sec_per_step"] * (r["step"] - prev["step"])
                                                      for prev, r in zip([{"step": 0}] + logged, logged)), 3))
    else:
        summary.update(final_train_loss=sum(recent_losses) / len(recent_losses) if recent_losses else None,
                       sec_per_step=sorted(step_times)[len(step_times) // 2] if step_times else None)
    if evaluate is not None:
        metrics = evaluate(model)
        log({"step": final_step, **{f"eval_{k}": v for k, v in metrics.items()}})
        summary["eval"] = metrics
    if ckpt_dir is not None and config.checkpoint_every and not stopped and start < config.steps:
        _save_checkpoint(ckpt_dir, final_step, method, optimizer, config)
    return summary


# ---------------------------------------------------------------------------------------
# Fine-tuning a base on a task: what `lora-diffusion train`, the app and notebooks call
# ---------------------------------------------------------------------------------------

def fine_tune(backbone, task, method, config: TrainConfig, out_dir=None, max_length: int | None = None,
              truncate: bool = False, sampler_steps: int = 64, eval_batch_size: int = 64,
              monitor_examples: int = 200, on_log=None, should_stop=None, progress: bool = True) -> dict:
    """Train `method` on `task.train`, evaluate on `task.eval`, save adapter + results in `out_dir`.

    During training a fixed slice of the held-out split (`monitor_examples`) is scored every
    `config.eval_every` steps to show progress; the reported metrics use the whole split.
    """
    from .data import batch_schedule, collate, encode, response_length_for
    from .diffusion import DiffusionLM
    from .evaluate import evaluate_task
    from .io import save_adapter, write_json

    torch.manual_seed(config.seed)  # the method's own init
    tok = backbone.tokenizer
    max_length = max_length or backbone.max_length
    if max_length > backbone.max_length:
        from .errors import UserError
        raise UserError(f"--max-length {max_length} is longer than the model's {backbone.max_length} positions")
    fingerprint = backbone.fingerprint()  # of the base, before any training
    response_length = response_length_for(tok, task.train)
    enc = encode(tok, task.train, response_length, max_length, truncate, where=f"{task.name} train")
    model = DiffusionLM(backbone)
    method.attach(model)
    indices_for_step = batch_schedule(len(enc.prompts), config.batch_size, config.seed)

    def batch_for_step(step: int, micro: int) -> dict:
        return collate(enc, indices_for_step(step * config.grad_accum + micro), backbone.pad_id)

    eval_kwargs = dict(response_length=response_length, max_length=max_length, steps=sampler_steps,
                       batch_size=eval_batch_size, seed=config.seed, truncate=truncate)

    def monitor(m) -> dict:
        r = evaluate_task(m, task, max_examples=monitor_examples, **eval_kwargs)
        keys = ("accuracy", "verbalizer_accuracy") if task.kind == "classification" else ("rouge_l", "token_f1")
        return {f"monitor_{k}": round(r[k], 4) for k in keys}

    began = time.time()
    summary = train(model, method, batch_for_step, config, out_dir=out_dir, evaluate=monitor,
                    on_log=on_log, should_stop=should_stop, progress=progress)
    summary["train_seconds"] = round(time.time() - began, 1)
    if method.can_merge:  # evaluate as it is served: merged into the base, as `eval --adapter` does
        method.merge()
    metrics = evaluate_task(model, task, **eval_kwargs)
    if method.can_merge:
        method.unmerge()
    result = {**metrics, "method": method.name, "options": method.config(), "seed": config.seed,
              "n_train": len(task.train), **method.accounting(), "train": summary,
              "config": asdict(config), "base": backbone.label, "source": task.source}
    if enc.n_truncated:
        result["n_train_truncated"] = enc.n_truncated
    if out_dir is not None:
        save_adapter(Path(out_dir) / "adapter", method, backbone, fingerprint, task,
                     response_length=response_length, max_length=max_length, train_summary=summary)
        write_json(Path(out_dir) / "results.json", result)
    result["model"] = model
    return result
