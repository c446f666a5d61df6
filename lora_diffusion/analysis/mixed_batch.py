"""Many adapters in one batch: generation throughput when every row has its own adapter.

A batch of `batch_size` rows is decoded (a) with one LoRA-Diffusion adapter attached
as usual and (b) through a `Composition` that assigns the rows round-robin to M
adapters, each adapter's modules running on its own rows only. The frozen body runs
once for the batch either way; (b) adds a loop over the adapters. Throughput is
response tokens per second (median over repeats, after a warm-up call that also
calibrates the modules). Adapters are freshly initialised: the cost does not depend on
what they learnt.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..backbone import load_backbone, tiny_backbone
from ..diffusion import DiffusionLM, sample
from ..methods import make_method
from ..profiling import synthetic_batch
from ..router import Composition


def _latency(model, batch: dict, steps: int, repeats: int) -> float:
    times = []
    for repeat in range(1 + repeats):  # the first call warms up (and calibrates)
        began = time.perf_counter()
        sample(model, **batch, steps=steps, generator=torch.Generator().manual_seed(repeat))
        if repeat:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def mixed_batch_report(adapter_counts=(8, 32), base=None, batch_size: int = 32, prompt_length: int = 32,
                       response_length: int = 16, steps: int = 16, repeats: int = 3, options: dict | None = None,
                       tiny: dict | None = None, log=None) -> dict:
    """Tokens/s of one adapter against M adapters mixed row by row, for each M in `adapter_counts`."""
    backbone = tiny_backbone(seed=0, **tiny) if tiny is not None else load_backbone(base)
    batch = synthetic_batch(backbone.tokenizer, batch_size, prompt_length, response_length)
    tokens = batch_size * response_length
    torch.manual_seed(0)
    single = DiffusionLM(backbone).eval()
    method = make_method("lora_diffusion", options or {})
    method.attach(single)
    one = _latency(single, batch, steps, repeats)
    method.detach()
    rows = []
    for count in adapter_counts:
        model = DiffusionLM(backbone).eval()
        methods = [make_method("lora_diffusion", options or {}) for _ in range(count)]
        for j, m in enumerate(methods):
            m.add_modules(model, f"task_{j}")
        composition = Composition(model, methods, [f"adapter {j}" for j in range(count)])
        composition.assign([i % count for i in range(batch_size)])
        latency = _latency(model, batch, steps, repeats)
        composition.remove()
        rows.append({"adapters": count, "latency_s": latency, "tokens_per_s": tokens / latency,
                     "throughput_ratio": one / latency})
        if log:
            log(f"{count} adapters in one batch of {batch_size}: {tokens / latency:,.0f} tokens/s "
                f"({one / latency:.2f}x one adapter's)")
    return {"batch_size": batch_size, "prompt_length": prompt_length, "response_length": response_length,
            "steps": steps, "repeats": repeats, "options": options or {}, "threads": torch.get_num_threads(),
            "device": "cpu", "one_adapter": {"latency_s": one, "tokens_per_s": tokens / one}, "mixed": rows}
