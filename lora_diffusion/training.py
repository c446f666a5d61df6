"""The training loop: one loop for every method, for task fine-tuning and for preparing the base.

AdamW, linear warmup then cosine decay, gradient accumulation and clipping, optional
bf16 autocast, periodic held-out evaluation, a JSONL metrics log, and atomic
checkpoints (safetensors + JSON) from which a run killed at any moment resumes
exactly: the batch and the noise of every step are functions of (seed, step), and a
checkpoint keeps everything else a later step depends on (weights, optimiser state,
every random generator, the log's length). A resumed run ends with the same tensors
and the same log as an uninterrupted one. The loop does steps; what a run is (data,
evaluation, saving the adapter) is `runs.py`'s business.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .base_cache import BaseStateCache
from .bounds import CACHE_MB, MAX_LR, MAX_SEED
from .diffusion import DiffusionLM, diffusion_loss
from .distributed import Processes, full, is_main, micro_batches_per_step, my_micro_batches, shard_like, world_size
from .errors import UserError, cut
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
    tf32: bool = False           # TF32 matmuls on an NVIDIA GPU (Ampere or later)
    compile: bool = False        # torch.compile the step's forward (the first steps compile)
    cache_base: bool = False     # keep the frozen base's last states per input (base_cache.py)
    cache_base_mb: float = CACHE_MB  # at most this much of them (0: keep none: the base runs, without dropout)
    eval_every: int = 0          # 0: evaluate only at the end
    checkpoint_every: int = 100  # 0: no checkpoints
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self):
        """Refuse, naming the flag as the CLI spells it, a value the loop cannot run with."""
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_every", "checkpoint_every"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.lr is not None:  # None: the method's default (0 is refused, not read as the default)
            _check_number("lr", self.lr, f"a number > 0 and <= {MAX_LR:g}", lambda x: 0 < x <= MAX_LR)
        _check_number("warmup", self.warmup, "a finite number from 0 to 1", lambda x: 0 <= x <= 1)
        _check_number("weight_decay", self.weight_decay, "a finite number >= 0", lambda x: x >= 0)
        _check_number("clip", self.clip, "a finite number >= 0 (0 = off)", lambda x: x >= 0)
        _check_number("cache_base_mb", self.cache_base_mb, "a finite number of MB >= 0", lambda x: x >= 0)
        if self.cache_base_mb != CACHE_MB and not self.cache_base:
            raise UserError("--cache-base-mb sizes the cache of --cache-base: give both, or neither")
        check_device(self.device)
        if self.cache_base and self.compile:
            raise UserError("--cache-base and --compile do not go together: a compiled step cannot look up "
                            "the cache (pick one)")


def _check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        wanted += "" if maximum is None else f" and <= {maximum}"
        raise UserError(f"--{name.replace('_', '-')} must be {wanted}, not {value!r}")


def _check_number(name: str, value, wanted: str, ok: Callable[[float], bool]) -> None:
    # NaN fails every comparison (`nan < 0` too), so it is caught by isfinite, not by `ok`
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not ok(value)):
        raise UserError(f"--{name.replace('_', '-')} must be {wanted}, not {value!r}")


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or one this machine does not have."""
    if device in ("auto", "cpu"):
        return
    if isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device):
        count = _cuda_devices()
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device here; use --device cpu or auto")
        if ":" in device and int(device[5:]) >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}; use one of those or --device auto")
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: no MPS device here; use --device cpu or auto")
        return
    raise UserError(f"--device {device} is not a device: use auto, cpu, cuda, cuda:N or mps")


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(device: str = "auto") -> torch.device:
    check_device(device)
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
    """AdamW over the method's trainable parameters; no weight decay on vectors (biases, norms).

    On a GPU it is the fused kernel (one launch for every tensor instead of several each).
    """
    params = method.trainable_parameters()
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    fused = all(p.is_cuda for p in params.values()) or None
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused)


def use_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on an NVIDIA GPU (10 mantissa bits instead of 23)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class Diverged(UserError):
    """A step's loss or gradient norm was not finite; its update was not applied."""


class Objective(torch.nn.Module):
    """What a step minimises for one micro-batch: the diffusion loss and the method's penalty.

    Both come from one forward, so an engine wrapping this module (DDP, FSDP, DeepSpeed) sees
    every use of the trainable tensors inside its forward.
    """

    def __init__(self, model: DiffusionLM, method: Method, loss_fn=diffusion_loss):
        super().__init__()
        self.model = model
        self.method = method  # not a module: its tensors are registered in `model`
        self.loss_fn = loss_fn

    def forward(self, batch: dict, generator):
        return self.loss_fn(self.model, **batch, generator=generator), self.method.regularization()


def train_step(objective: Objective, method: Method, optimizer, params: list, micro_batches: list[dict],
               generators: list, lr: float, clip: float = 1.0, bf16: bool = False,
               processes: Processes | None = None) -> dict:
    """One optimiser step over gradient-accumulated micro-batches (already on the model's device).

    `params` are the method's trainable parameters, in its order (the gradient norm is
    clipped over them; DeepSpeed's step clips its own partitions). Returns the step's
    diffusion loss (what is reported), the method's penalty and the gradient norm before
    clipping. A NaN or infinite loss or gradient norm raises `Diverged` without touching
    the weights. On several `processes` the objective is the engine's wrapper (see
    `Processes.accumulating` for when gradients are averaged), each micro-batch draws its
    dropout from its generator's seed, and the reported numbers are averaged over the
    processes, so every process decides alike.
    """
    processes = processes or Processes()
    device_type = next(objective.parameters()).device.type
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = step_penalty = 0.0
    for i, (batch, generator) in enumerate(zip(micro_batches, generators)):
        if processes.accelerator is not None:
            torch.manual_seed(generator.initial_seed())  # dropout: a function of (seed, step, micro-batch)
        with processes.accumulating(objective, last=i == len(micro_batches) - 1):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss, penalty = objective(batch, generator)  # penalty: the method's regularisers, or None
            total = loss if penalty is None else loss + penalty
            processes.backward(objective, total / len(micro_batches))
        step_loss += loss.item() / len(micro_batches)
        step_penalty += (0.0 if penalty is None else penalty.item()) / len(micro_batches)
    processes.average_replicated()
    step_loss, step_penalty = processes.mean(step_loss), processes.mean(step_penalty)
    # One NaN update would spoil every weight for good: neither a non-finite loss nor a
    # non-finite gradient norm gets one.
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"loss {step_loss}")
    grad_norm = processes.step(optimizer, params, clip)
    if not math.isfinite(grad_norm):
        raise Diverged(f"gradient norm {grad_norm}")
    method.after_step(lr)
    return {"loss": step_loss, "penalty": step_penalty, "grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-N/ holds trainable.safetensors (the method's state),
# optimizer.safetensors (AdamW's moments), rng.safetensors (torch's generators) and
# state.json (TrainState, the optimiser's param groups, Python's and NumPy's generators);
# out/checkpoints/latest.json names the newest complete one and is written last.
# ---------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """What the loop carries from one step to the next, beyond the weights: a checkpoint keeps it."""

    step: int = 0                                     # optimiser steps done
    window: list[dict] = field(default_factory=list)  # stats of the last log_every steps
    seconds: float = 0.0                              # training time so far, over every process of the run
    log_lines: int = 0                                # lines in metrics.jsonl
    final_eval: dict | None = None                    # the end-of-run evaluation, once done
    identity: dict | None = None                      # what is trained (method, data, base): a resume must match

    def start_clock(self) -> None:
        self._since = time.perf_counter() - self.seconds  # this process carries on the earlier ones' time

    def tick(self) -> None:
        self.seconds = round(time.perf_counter() - self._since, 3)


def rng_state() -> tuple[dict, dict]:
    """Every random generator a step may draw from, as (tensors, JSON-able lists).

    Dropout draws from torch's global generator (and CUDA's on a GPU); Python's and
    NumPy's are kept too, for a method or a batch function that uses them.
    """
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        tensors.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python_random": [version, list(internal), gauss],
                     "numpy_random": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(tensors: dict, lists: dict) -> None:
    """Put back what `rng_state` returned (CUDA's only where this machine has that device)."""
    torch.set_rng_state(tensors["torch"])
    for key, value in tensors.items():
        if key.startswith("cuda:") and int(key[5:]) < _cuda_devices():
            torch.cuda.set_rng_state(value, int(key[5:]))
    version, internal, gauss = lists["python_random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = lists["numpy_random"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_tensors(method: Method, optimizer) -> tuple[dict, dict, list]:
    """The method's state, AdamW's moments (as "index.name") and its param groups, whole.

    Under FSDP and DeepSpeed, gathering the shards is a collective: every process calls this."""
    opt_state = optimizer.state_dict()
    moments = {f"{idx}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
               for idx, param_state in opt_state["state"].items() for key, value in param_state.items()}
    return full(method.state_dict()), full(moments), opt_state["param_groups"]


def save_checkpoint(folder: Path, method: Method, optimizer, config: TrainConfig, state: TrainState) -> None:
    """Write `step-N/`, then point latest.json at it, then delete the older step folders.

    latest.json is the commit point: a write killed before it leaves the previous
    checkpoint in charge (`RunFolder.resume` deletes the half-written folder).
    """
    trainable, moments, param_groups = checkpoint_tensors(method, optimizer)
    ckpt = folder / f"step-{state.step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_tensors(ckpt / "trainable.safetensors", trainable)
    save_tensors(ckpt / "optimizer.safetensors", moments)
    rng_tensors, rng_lists = rng_state()
    save_tensors(ckpt / "rng.safetensors", rng_tensors)
    write_json(ckpt / "state.json", {**asdict(state), "config": asdict(config),
                                     "param_groups": param_groups, **rng_lists})
    write_json(folder / "latest.json", {"step": state.step, "path": ckpt.name})  # the commit point
    for old in folder.glob("step-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old, ignore_errors=True)


# What decides a run's result: resuming with another value would silently make a different run.
RESUME_MUST_MATCH = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "clip", "seed", "bf16",
                     "tf32", "cache_base")


def load_checkpoint(folder: Path, method: Method, optimizer, config: TrainConfig | None = None,
                    identity: dict | None = None) -> TrainState:
    """Load the checkpoint latest.json names into `method`, `optimizer` and the random generators,
    after checking that it is the same run (`config`'s settings and `identity`, where given)."""
    ckpt = folder / read_json(folder / "latest.json")["path"]
    saved = read_json(ckpt / "state.json")
    if "log_lines" not in saved:
        raise UserError(f"{ckpt} was written by an older lora-diffusion that cannot resume exactly; "
                        f"delete {folder} to start the run over")
    _check_same_run(folder.parent, saved, config, identity)
    method.load_state_dict(load_tensors(ckpt / "trainable.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in load_tensors(ckpt / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value if name == "step" else shard_like(params[int(idx)], value)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    set_rng_state(load_tensors(ckpt / "rng.safetensors"), saved)
    return TrainState(**{f.name: saved.get(f.name) for f in fields(TrainState)})


# What an older checkpoint's identity lacks had this value then.
IDENTITY_DEFAULTS = {"processes": 1}


def _check_same_run(out_dir: Path, saved: dict, config: TrainConfig | None, identity: dict | None) -> None:
    """Refuse to resume another run: other settings, method, options, data or base would make a third one."""
    defaults = asdict(TrainConfig())  # a setting an older checkpoint lacks had its default then
    was = {k: saved["config"].get(k, defaults[k]) for k in RESUME_MUST_MATCH if config is not None and
           saved["config"].get(k, defaults[k]) != getattr(config, k)}
    if identity is not None and saved.get("identity") is not None:
        now = json.loads(json.dumps(identity))  # as it would read back: lists, not tuples
        then = {**IDENTITY_DEFAULTS, **saved["identity"]}
        was.update({k: then.get(k) for k in now if then.get(k) != now[k]})
    if was:
        shown = ", ".join(f"{k}={cut(json.dumps(v))}" for k, v in was.items())
        raise UserError(f"{out_dir} holds a run with {shown}; resume it with the same settings, "
                        "or give a new --out")


def _remove_unfinished(folder: Path) -> None:
    """Delete what a killed checkpoint write left: step folders latest.json does not name, temporary files."""
    latest = folder / "latest.json"
    keep = read_json(latest)["path"] if latest.is_file() else None
    for path in folder.glob("step-*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink()


class RunFolder:
    """A run's metrics log and checkpoints (or nothing, without an output folder)."""

    def __init__(self, out_dir=None, on_log: Callable[[dict], None] | None = None, writer: bool = True,
                 gathers: bool = False):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_log = on_log
        self.writer = writer  # False: another process of the run writes; this one only reads checkpoints
        self.gathers = gathers  # FSDP, DeepSpeed: every process takes part in gathering what the writer writes
        if self.out_dir is not None and writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out_dir / "metrics.jsonl" if self.out_dir else None
        self.checkpoints = self.out_dir / "checkpoints" if self.out_dir else None
        self.lines = 0  # lines in the metrics log: each checkpoint records how many

    def resume(self, method: Method, optimizer, config: TrainConfig | None = None,
               identity: dict | None = None) -> TrainState:
        """The state to start from: the last complete checkpoint's (loaded), else a fresh one.

        The log is cut back to the lines it had when that checkpoint was taken: the run
        writes the later ones again, so none is doubled, whenever the last process died.
        """
        state = TrainState()
        if self.checkpoints is not None:
            if self.checkpoints.is_dir() and self.writer:
                _remove_unfinished(self.checkpoints)
            if (self.checkpoints / "latest.json").is_file():
                state = load_checkpoint(self.checkpoints, method, optimizer, config, identity)
            if self.writer:
                kept = self.records()[:state.log_lines]
                write_jsonl(self.metrics, kept)
                self.lines = len(kept)
        state.start_clock()
        return state

    def save(self, method: Method, optimizer, config: TrainConfig, state: TrainState) -> None:
        """A checkpoint of `state` (if this run keeps checkpoints). Every process calls it: under
        FSDP and DeepSpeed they all gather what the writer writes."""
        if self.checkpoints is None or not config.checkpoint_every:
            return
        if not self.writer:
            if self.gathers:
                checkpoint_tensors(method, optimizer)  # this process's part of the gather
            return
        state.tick()
        state.log_lines = self.lines
        save_checkpoint(self.checkpoints, method, optimizer, config, state)

    def last_checkpoint(self) -> int | None:
        """The step of the newest complete checkpoint, if there is one."""
        latest = self.checkpoints / "latest.json" if self.checkpoints else None
        return read_json(latest)["step"] if latest is not None and latest.is_file() else None

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        if self.metrics is not None:
            append_jsonl(self.metrics, record)
            self.lines += 1
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
          should_stop: Callable[[], bool] | None = None, progress: bool = True,
          identity: dict | None = None, evaluate_if_stopped: bool = True) -> dict:
    """Train `method` (already attached to `model`) and return a summary.

    A run that `should_stop` ends is evaluated at its last step like a finished one, unless
    `evaluate_if_stopped` is False (the app's Stop: the run ends at once).

    `identity` says what is trained beyond `config` (method, options, data, base): a
    checkpoint of another identity in `out_dir` is refused instead of resumed.

    `batch_for_step(step, micro)` gives the micro-batch `micro` of optimiser step `step`.
    With `out_dir`, metrics go to `out_dir/metrics.jsonl` and checkpoints to
    `out_dir/checkpoints/`; an existing checkpoint there is resumed from, and a finished
    run is only reported, not trained or evaluated again.

    Under `accelerate launch` or `torchrun` every process runs this loop on its share of
    each step's micro-batches (see `distributed`); only the main one evaluates and writes.
    Every process must be given the same `evaluate` (or none): under FSDP they all gather
    the model for it.
    """
    if micro_batches_per_step(config.grad_accum) > 101:  # step_generator's seeds would repeat
        raise UserError(f"at most 101 micro-batches per step (--grad-accum x processes), not "
                        f"{micro_batches_per_step(config.grad_accum)}: raise --batch-size instead")
    if config.cache_base and not method.reads_final_states_only:
        raise UserError(f"--cache-base needs a method that reads only the base's last hidden states "
                        f"(lora_diffusion with injection=final); {method.name} with these options acts inside "
                        "the base, so its states change as it trains")
    processes = Processes(config.device)
    if processes.sharded and (config.cache_base or config.compile):
        raise UserError("under FSDP, --cache-base and --compile are not offered: launch with "
                        "configs/accelerate/ddp.yaml, or train without them")
    if processes.engine == "deepspeed" and config.compile:
        raise UserError("under DeepSpeed, --compile is not offered: launch with configs/accelerate/ddp.yaml, "
                        "or train without it")
    device = processes.device or pick_device(config.device)
    use_tf32(device, config.tf32)
    model.to(device)
    lr = config.lr if config.lr is not None else method.default_lr
    run = RunFolder(out_dir, on_log, writer=is_main(), gathers=processes.gathers)
    objective = Objective(model, method, loss_fn)
    if world_size() > 1 and run.last_checkpoint() is None:
        # A method that calibrates on the first batch it sees (LoRA-Diffusion) must see the
        # same one on every process: micro-batch 0, without dropout, before any step.
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            objective(_to(batch_for_step(0, 0), device), step_generator(config.seed, 0, 0))
    in_base = {id(p) for p in model.backbone.mlm.parameters()}
    # Under FSDP the base is sharded (trained or not); the method's own modules, small, and some
    # unused at a step (a phase no example is in), stay whole on every process.
    objective = processes.wrap(objective, units=list(model.backbone.blocks()),
                               replicated=[p for p in method.trainable_parameters().values()
                                           if id(p) not in in_base])
    held = processes.held_bytes(model)
    params = list(method.trainable_parameters().values())  # after FSDP replaced them with shards
    objective, optimizer = processes.prepare_optimizer(objective, make_optimizer(method, lr, config.weight_decay),
                                                       config.batch_size, config.grad_accum, config.clip)
    state = run.resume(method, optimizer, config, identity)  # every process loads the checkpoint
    state.identity = identity
    start = state.step
    if config.compile:  # batches change length: compile for dynamic shapes from the start
        objective = torch.compile(objective, dynamic=True)
    if evaluate is not None:
        evaluate = _on_main(evaluate, processes, objective)
    cache = BaseStateCache(config.cache_base_mb) if config.cache_base else None
    model.train()
    stopped = False
    # In a log file (not a terminal) a bar line every 10 s is enough.
    with _serving(model, cache), _every_parameter(method, processes.engine == "deepspeed"), \
            tqdm(total=config.steps, initial=start, disable=not progress or not is_main(), desc="train",
                 unit="step",  # the bar is closed before an error is shown
                 mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
        for step in range(start, config.steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            began = time.perf_counter()
            micro = my_micro_batches(config.grad_accum)
            try:
                stats = train_step(objective, method, optimizer, params,
                                   [_to(batch_for_step(step, m), device) for m in micro],
                                   [step_generator(config.seed, step, m) for m in micro],
                                   lr * lr_factor(step, config.steps, config.warmup), config.clip, config.bf16,
                                   processes)
            except Diverged as err:
                raise _diverged(step + 1, err, run) from None
            state.step = step + 1
            state.window = (state.window + [{**stats, "seconds": time.perf_counter() - began}])[-config.log_every:]
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            _after_step(config, state, optimizer, run, model, method, evaluate)
    model.eval()
    if start < config.steps:  # else it was finished before: a restart only reports it
        final_evaluate = None if stopped and not evaluate_if_stopped else evaluate
        _finish(config, state, optimizer, run, model, method, final_evaluate, stopped)
    summary = {"steps": state.step, "stopped_early": stopped, "resumed_from_step": start, "lr": lr,
               "device": str(device), "processes": world_size(), "engine": processes.engine,
               "parameter_bytes_held": held,  # by this process, between forwards
               "optimizer_bytes_held": processes.optimizer_bytes(optimizer),  # by this process, at the end
               "global_batch": config.batch_size * micro_batches_per_step(config.grad_accum),
               "train_seconds": state.seconds,
               **summarize(run.records(), state.window)}
    if cache is not None:  # this process's, over the steps since `resumed_from_step`
        summary["base_cache"] = cache.summary()
    if state.final_eval is not None:
        summary["eval"] = state.final_eval
    return summary


def _on_main(evaluate: Callable[[DiffusionLM], dict], processes: Processes, objective):
    """`evaluate` run by the main process alone (None elsewhere); every process calls this,
    since under FSDP they all gather the model first, and all wait for the main one after."""
    def on_main(model: DiffusionLM) -> dict | None:
        with processes.whole_model(objective):
            scores = evaluate(model) if is_main() else None
        processes.wait_for_all()  # the others wait in a barrier of hours, not in the next step's collectives
        return scores
    return on_main


@contextlib.contextmanager
def _every_parameter(method: Method, on: bool):
    """`Method.every_parameter_each_step` (under DeepSpeed) for this run's steps only."""
    method.every_parameter_each_step = on
    try:
        yield
    finally:
        method.every_parameter_each_step = False


@contextlib.contextmanager
def _serving(model: DiffusionLM, cache: BaseStateCache | None):
    """The cache serves this run's training steps only; it is dropped however the loop ends."""
    model.base_cache = cache
    try:
        yield
    finally:
        model.base_cache = None


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _diverged(step: int, err: Diverged, run: RunFolder) -> UserError:
    kept = run.last_checkpoint()
    kept = f"the last good checkpoint (step {kept}) is kept to look at; " if kept is not None else ""
    return UserError(f"training diverged at step {step} ({err}); {kept}start again with a lower --lr "
                     "and a new --out")


def _after_step(config: TrainConfig, state: TrainState, optimizer, run: RunFolder, model, method,
                evaluate) -> None:
    """The log line, the periodic held-out check and the checkpoint due after step `state.step`."""
    done, window = state.step, state.window
    if done % config.log_every == 0 or done == config.steps:
        record = {"step": done, "loss": sum(w["loss"] for w in window) / len(window),
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": window[-1]["grad_norm"],
                  "sec_per_step": sum(w["seconds"] for w in window) / len(window)}
        if any(w["penalty"] for w in window):
            record["penalty"] = sum(w["penalty"] for w in window) / len(window)
        run.log(record)
    if done == config.steps:
        return  # the last step's evaluation and checkpoint come in `_finish`
    if evaluate is not None and config.eval_every and done % config.eval_every == 0:
        model.eval()
        scores = evaluate(model)  # None on all but the main process
        if scores is not None:
            run.log({"step": done, **{f"eval_{k}": v for k, v in scores.items()}})
        model.train()
    if config.checkpoint_every and done % config.checkpoint_every == 0:
        run.save(method, optimizer, config, state)


def _finish(config: TrainConfig, state: TrainState, optimizer, run: RunFolder, model, method, evaluate,
            stopped: bool) -> None:
    """The final evaluation and its log line, then the final checkpoint.

    In this order, a kill anywhere before the checkpoint is committed resumes from an
    earlier one whose log has no final line yet; once it is committed, the run is done.
    """
    if evaluate is not None:
        state.final_eval = evaluate(model)  # None on all but the main process
        if state.final_eval is not None:
            run.log({"step": state.step, **{f"eval_{k}": v for k, v in state.final_eval.items()}})
    state.tick()
    if not stopped:  # a stopped run resumes from its last periodic checkpoint
        run.save(method, optimizer, config, state)


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
