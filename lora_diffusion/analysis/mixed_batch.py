"""Many adapters in one batch: generation throughput when every row has its own adapter.

For each method (LoRA-Diffusion and weight LoRA), a batch of `batch_size` rows is decoded
(a) with one adapter loaded as usual, unmerged, and (b) by `MixedAdapters` with the rows
assigned round-robin to M adapters of that method (LoRA-Diffusion: the adapters' weights
stacked, each row gathering its own; weight LoRA: peft's mixed-batch `adapter_names`). The
frozen body runs once for the batch either way. Throughput is response
tokens per second (median over repeats, after a warm-up call that also calibrates
LoRA-Diffusion's modules). The adapters are freshly initialised, with the up / B
matrices made non-zero: the cost does not depend on what they learnt. They are saved and
loaded back, so the timed path is the one `sample --adapter A B ...` takes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..adapters import load_adapter, save_adapter
from ..backbone import load_backbone, tiny_backbone
from ..diffusion import DiffusionLM, sample
from ..methods import make_method
from ..mixed import MixedAdapters
from ..profiling import synthetic_batch
from ..data import load_task


def _latency(model, batch: dict, steps: int, repeats: int) -> float:
    times = []
    for repeat in range(1 + repeats):  # the first call warms up (and calibrates)
        began = time.perf_counter()
        sample(model, **batch, steps=steps, generator=torch.Generator().manual_seed(repeat))
        if repeat:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _saved_adapters(backbone, method: str, options: dict, count: int, folder: Path) -> list[Path]:
    task = load_task("suite_topic", max_train=8, max_eval=4)  # what the adapter files record as their task
    fingerprint = backbone.fingerprint()  # of the base alone, before a method wraps it
    paths = []
    for j in range(count):
        model = DiffusionLM(backbone)
        m = make_method(method, options)
        m.attach(model)
        with torch.no_grad():  # non-zero, so every adapter really acts
            for p in m.trainable_parameters().values():
                p.add_(0.01 * torch.randn_like(p))
        save_adapter(folder / f"{method}-{j}", m, backbone, fingerprint, task, 2, 128)
        m.detach()
        paths.append(folder / f"{method}-{j}")
    return paths


def mixed_batch_report(adapter_counts=(8, 32), base=None, batch_size: int = 32, prompt_length: int = 32,
                       response_length: int = 16, steps: int = 16, repeats: int = 3,
                       methods=("lora_diffusion", "lora"), options: dict | None = None,
                       tiny: dict | None = None, log=None) -> dict:
    """Tokens/s of one adapter against M adapters mixed row by row, per method, for each M in
    `adapter_counts` (`options`: method -> its options, default the method's defaults)."""
    backbone = tiny_backbone(seed=0, **tiny) if tiny is not None else load_backbone(base)
    batch = synthetic_batch(backbone.tokenizer, batch_size, prompt_length, response_length)
    tokens = batch_size * response_length
    report = {"batch_size": batch_size, "prompt_length": prompt_length, "response_length": response_length,
              "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(), "device": "cpu",
              "methods": []}
    with tempfile.TemporaryDirectory() as tmp:
        if tiny is not None:  # a folder the adapters can name as their base
            backbone.mlm.save_pretrained(Path(tmp) / "base")
            backbone.tokenizer.save_pretrained(Path(tmp) / "base")
            base = str(Path(tmp) / "base")
        for method in methods:
            chosen = (options or {}).get(method, {})
            paths = _saved_adapters(backbone, method, chosen, max(adapter_counts), Path(tmp))
            single, _, _ = load_adapter(paths[0], base=base, merge=False)
            one = _latency(single, batch, steps, repeats)
            del single
            rows = []
            for count in adapter_counts:
                mixed = MixedAdapters(paths[:count], base=base)
                mixed.assign([i % count for i in range(batch_size)])
                latency = _latency(mixed.model, batch, steps, repeats)
                mixed.remove()
                rows.append({"adapters": count, "latency_s": latency, "tokens_per_s": tokens / latency,
                             "throughput_ratio": one / latency})
                if log:
                    log(f"{method}: {count} adapters in one batch of {batch_size}: {tokens / latency:,.0f} tokens/s "
                        f"({one / latency:.2f}x one adapter's)")
            report["methods"].append({"method": method, "options": chosen,
                                      "one_adapter": {"latency_s": one, "tokens_per_s": tokens / one},
                                      "mixed": rows})
    return report
