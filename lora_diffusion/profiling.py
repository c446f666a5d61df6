"""Measured cost of training and generation: step time, peak memory, parameters, bytes.

Every measurement runs in a fresh child process (spawned), so one method's allocations
never count against another's and the process starts from the same state each time.

Peak memory:
* CUDA: `torch.cuda.max_memory_allocated()` over loading, attaching and the measured
  steps (weights, gradients, optimizer state and activations).
* CPU (Linux): the kernel's high-water mark of resident memory (VmHWM). The child resets
  it (`/proc/self/clear_refs` = 5) after its imports, then loads the base, attaches the
  method and trains; the result is VmHWM minus the resident memory at the reset: what
  loading, attaching and training added at their peak. It counts what the allocator
  holds, so it is an upper bound of the live peak. Elsewhere `ru_maxrss` stands in (an
  import-time peak can then hide a smaller training peak).

Step time: median over `steps` measured steps after `warmup` steps that are not timed; a
step is `training.train_step`, the very step the training loop takes (loss, backward,
gradient clipping, AdamW, the method's proximal update).

Throughput: tokens per second (batch x sequence length / step time), and the model FLOPs
of a step, counted by torch's FlopCounterMode (matmuls and attention, forward and
backward) on untimed repeats of the timed steps (same noise, so the same masked counts)
and averaged; their rate over the device's peak is the MFU (model FLOPs utilisation),
given where the peak is known (`PEAK_FLOPS`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbone import load_backbone, tiny_backbone
from .diffusion import DiffusionLM, sample
from .errors import UserError
from .methods import make_method
from .paths import SHIPPED_BASE
from .training import Objective, make_optimizer, pick_device, step_generator, train_step, use_tf32

# Dense peak FLOP/s from NVIDIA's data sheets, by a part of the device name (the first that
# matches: the PCIe and NVL H100s before the SXM one): bf16 and TF32 tensor cores, plain
# fp32. A CPU's peak is not known here: no MFU.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def peak_flops(device_name: str | None, bf16: bool, tf32: bool) -> float | None:
    """The data-sheet peak of a named GPU in the precision the matmuls run in (None if unknown)."""
    for model, peaks in PEAK_FLOPS.items():
        if device_name and model in device_name:
            return peaks["bf16" if bf16 else "tf32" if tf32 else "fp32"]
    return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the resident-memory high-water mark where the kernel allows it; returns the RSS now (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return 1024 * _status_kib("VmRSS")
    except (OSError, TypeError):
        return peak_rss()


def peak_rss() -> int:
    """The process's resident-memory high-water mark in bytes."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def synthetic_batch(tokenizer, batch_size: int, prompt_length: int, response_length: int, seed: int = 0) -> dict:
    """A batch in the task layout with random word tokens: the same for every method."""
    g = torch.Generator().manual_seed(seed)
    low = 1000  # past the special tokens and [unusedN] of a BERT vocabulary
    length = prompt_length + response_length
    ids = torch.randint(low, len(tokenizer), (batch_size, length), generator=g)
    ids[:, 0] = tokenizer.cls_token_id
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_length:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response,
            "instruction": ids[:, 1:9].clone()}


def _load_base(spec: dict):
    return tiny_backbone(seed=0, **spec.get("tiny", {})) if spec["base"] == "tiny" else load_backbone(spec["base"])


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_profile(spec: dict) -> dict:
    """Runs in the child: build everything, time `steps` training steps (`training.train_step`), read the peak."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = pick_device(spec.get("device", "auto"))
    use_tf32(device, spec.get("tf32", False))
    rss_before = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backbone = _load_base(spec)
    batch = synthetic_batch(backbone.tokenizer, spec["batch_size"], spec["prompt_length"], spec["response_length"])
    batch = {k: v.to(device) for k, v in batch.items()}
    model = DiffusionLM(backbone).to(device)
    method = make_method(spec["method"], spec.get("options", {}))
    method.attach(model)
    model.to(device).train()
    optimizer = make_optimizer(method, lr=1e-5)
    params = list(method.trainable_parameters().values())
    objective = Objective(model, method)
    if spec.get("compile"):
        objective = torch.compile(objective, dynamic=True)
    step = lambda n: train_step(objective, method, optimizer, params, [batch], [step_generator(0, n)], lr=1e-5,
                                bf16=spec.get("bf16", False))
    times = []
    for n in range(spec["warmup"] + spec["steps"]):
        _synchronize(device)
        began = time.perf_counter()
        step(n)
        _synchronize(device)
        if n >= spec["warmup"]:
            times.append(time.perf_counter() - began)
    optimizer_state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
    sec_per_step = statistics.median(times)
    memory = _peak_memory(device, rss_before)  # of training alone: counting FLOPs holds more
    with FlopCounterMode(display=False) as counter:  # after the timed steps: counting slows a step
        for n in range(spec["warmup"], spec["warmup"] + spec["steps"]):
            step(n)
    flops = counter.get_total_flops() / spec["steps"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_flops(device_name, spec.get("bf16", False), spec.get("tf32", False))
    tokens = spec["batch_size"] * (spec["prompt_length"] + spec["response_length"])
    out = {"sec_per_step": sec_per_step, "step_times": times, "device": str(device),
           "tokens_per_s": tokens / sec_per_step, "flops_per_step": flops,
           "achieved_flops_per_s": flops / sec_per_step, "peak_flops_per_s": peak,
           "mfu": flops / sec_per_step / peak if peak else None,
           "tf32": spec.get("tf32", False), "compiled": spec.get("compile", False),
           "dtype": "bf16-autocast" if spec.get("bf16") else str(next(backbone.parameters()).dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "optimizer_state_bytes": optimizer_state,
           **method.accounting(), **memory}
    return out


def _peak_memory(device, rss_before: int) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_method": "torch.cuda.max_memory_allocated over load + attach + training",
                "device_name": torch.cuda.get_device_name(device)}
    return {"peak_memory_bytes": peak_rss() - rss_before,
            "peak_memory_method": "resident-memory high-water mark over load + attach + training (VmHWM)"}


def profile_training(method: str, options: dict | None = None, base: str = "shipped", batch_size: int = 16,
                     prompt_length: int = 48, response_length: int = 16, steps: int = 10, warmup: int = 3,
                     bf16: bool = False, device: str = "auto", threads: int | None = None,
                     tiny: dict | None = None, isolated: bool = True, tf32: bool = False,
                     compile: bool = False) -> dict:
    """Step time and peak memory of training `method` on a synthetic batch, in a fresh process.

    `base` is "shipped", a model folder, or "tiny" (a random model, for tests).
    """
    spec = {"method": method, "options": options or {}, "base": str(SHIPPED_BASE) if base == "shipped" else base,
            "batch_size": batch_size, "prompt_length": prompt_length, "response_length": response_length,
            "steps": steps, "warmup": warmup, "bf16": bf16, "device": device, "threads": threads,
            "tiny": tiny or {}, "isolated": isolated, "tf32": tf32, "compile": compile}
    payload = _run_child(_train_profile, spec)
    return {"method": method, "options": options or {}, "batch_size": batch_size,
            "sequence_length": prompt_length + response_length, "response_length": response_length,
            "steps": steps, "warmup": warmup, **payload}


# ---------------------------------------------------------------------------------------
# Generation: latency and throughput of the sampler
# ---------------------------------------------------------------------------------------

def _generation_profile(spec: dict) -> dict:
    """Runs in the child: time `sample()` for every (batch size, response length)."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = pick_device(spec.get("device", "auto"))
    backbone = _load_base(spec)
    model = DiffusionLM(backbone)
    method = None
    if spec["method"] != "base":
        method = make_method(spec["method"], spec.get("options", {}))
        method.attach(model)
        if spec.get("merged"):
            method.merge()
    model.to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("bf16", False))
    rows = []
    for batch_size in spec["batch_sizes"]:
        for length in spec["lengths"]:
            batch = synthetic_batch(backbone.tokenizer, batch_size, spec["prompt_length"], length)
            batch = {k: v.to(device) for k, v in batch.items()}
            times = []
            for repeat in range(spec["warmup"] + spec["repeats"]):
                _synchronize(device)
                began = time.perf_counter()
                with autocast:
                    sample(model, **batch, steps=spec["steps"], generator=torch.Generator().manual_seed(repeat))
                _synchronize(device)
                if repeat >= spec["warmup"]:
                    times.append(time.perf_counter() - began)
            latency = statistics.median(times)
            rows.append({"batch_size": batch_size, "response_length": length, "latency_s": latency,
                         "tokens_per_s": batch_size * length / latency, "times": times})
    return {"device": str(device), "threads": torch.get_num_threads(), "rows": rows,
            "dtype": "bf16-autocast" if spec.get("bf16") else "float32",
            **({"trainable_parameters": method.n_trainable()} if method else {})}


def _run_child(target, spec) -> dict:
    """`target(spec)` in a fresh spawned process (or here, with spec["isolated"] False: faster,
    but memory the allocator already holds then hides part of the peak)."""
    if not spec.get("isolated", True):
        return target(spec)

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_call, args=(target, spec, queue))
    child.start()
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                status, payload = "error", f"the profiling process died (exit code {child.exitcode})"
                break
    child.join()
    if status != "ok":
        raise UserError(f"profiling {spec['method']} failed: {payload}")
    return payload


def _child_call(target, spec, queue):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a measurement of one process, not a rank of the parent's run
        os.environ.pop(name, None)
    try:  # report, never hang the parent
        queue.put(("ok", target(spec)))
    except BaseException as err:
        queue.put(("error", f"{type(err).__name__}: {err}"))


def profile_generation(method: str = "base", options: dict | None = None, merged: bool = False,
                       base: str = "shipped", batch_sizes=(1, 8, 32), lengths=(16, 64, 128), steps: int = 16,
                       prompt_length: int = 32, repeats: int = 3, warmup: int = 1, bf16: bool = False,
                       device: str = "auto", threads: int | None = None, tiny: dict | None = None,
                       isolated: bool = True) -> dict:
    """Sampler latency (median seconds per call) and throughput (response tokens / s), fresh process.

    `method="base"` times the base alone; `merged` folds a mergeable method into the weights.
    """
    spec = {"method": method, "options": options or {}, "merged": merged,
            "base": str(SHIPPED_BASE) if base == "shipped" else base, "batch_sizes": list(batch_sizes),
            "lengths": list(lengths), "steps": steps, "prompt_length": prompt_length, "repeats": repeats,
            "warmup": warmup, "bf16": bf16, "device": device, "threads": threads, "tiny": tiny or {},
            "isolated": isolated}
    return {"method": method, "options": options or {}, "merged": merged, "steps": steps,
            "prompt_length": prompt_length, **_run_child(_generation_profile, spec)}


def bench_table(report: dict) -> str:
    """The `bench` report as a markdown table, one row per method or preset row."""
    rows = report["rows"]
    first = rows[0]
    gen = all("generation" in r for r in rows)
    lines = [f"Training step on one synthetic batch ({first['batch_size']} x {first['sequence_length']} tokens, "
             f"{first['response_length']} of them the response; median of {first['steps']} timed steps after "
             f"{first['warmup']}), {first['device']}, {first['threads']} threads, {first['dtype']}."
             + (" Generation: the sampler on a batch of the same shape, one step per response token, "
                "against the base alone; a method that merges (weight LoRA) merged, as it is served." if gen else ""),
             "",
             "| row | trainable params | adapter bytes | s/step | train tokens/s | peak memory (MB) |"
             + (" generation tokens/s | generation overhead |" if gen else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if gen else "")]
    for r in rows:
        line = (f"| {r.get('label', r['method'])} | {r['trainable_parameters']:,} | {r['adapter_bytes']:,} | "
                f"{r['sec_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_bytes'] / 2**20:,.0f} |")
        if gen:
            g = r["generation"]
            line += f" {g['tokens_per_s']:,.0f} | {100 * g['overhead']:+.0f}% |"
        lines.append(line)
    return "\n".join(lines) + "\n"
