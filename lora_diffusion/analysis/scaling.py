"""Rank scaling of memory and speed (the LoRA paper's cost questions, asked of this base).

For weight LoRA and LoRA-Diffusion (uniform rank r) at every rank, and for full
fine-tuning, adapters, BitFit and prefix tuning: trainable parameters, optimizer-state
bytes, peak training memory and train step time (`profiling.profile_training`), then
sampler latency and throughput over batch sizes and response lengths, merged and
unmerged where merging exists (`profiling.profile_generation`). Every point is measured
in a fresh process; medians over repeats with warm-up excluded; device and dtype are
recorded with each row.
"""

from __future__ import annotations

from ..profiling import profile_generation, profile_training

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
OTHERS = ("full", "adapter", "bitfit", "prefix")


def _rank_options(method: str, rank: int) -> dict:
    return {"schedule": "uniform", "rank": rank} if method == "lora_diffusion" else {"r": rank}  # the LoRA family


def rank_scaling_report(ranks=RANKS, others=OTHERS, base: str = "shipped", batch_size: int = 16,
                        prompt_length: int = 48, response_length: int = 16, steps: int = 10, warmup: int = 3,
                        gen_ranks=(8, 128), gen_batch_sizes=(1, 8, 32), gen_lengths=(16, 64, 128),
                        gen_steps: int = 16, gen_repeats: int = 3, bf16: bool = False, device: str = "auto",
                        threads: int | None = None, tiny: dict | None = None, isolated: bool = True,
                        log=None) -> dict:
    common = dict(base=base, device=device, threads=threads, tiny=tiny, bf16=bf16, isolated=isolated)
    train_rows = []
    for method in ("lora", "lora_diffusion"):
        for rank in ranks:
            row = profile_training(method, _rank_options(method, rank), batch_size=batch_size,
                                   prompt_length=prompt_length, response_length=response_length,
                                   steps=steps, warmup=warmup, **common)
            train_rows.append({**row, "rank": rank})
            if log:
                log(f"train {method} r={rank}: {row['sec_per_step']:.4f} s/step, {row['peak_memory_bytes'] / 2**20:.0f} MB")
    for method in others:
        row = profile_training(method, {}, batch_size=batch_size, prompt_length=prompt_length,
                               response_length=response_length, steps=steps, warmup=warmup, **common)
        train_rows.append({**row, "rank": None})
        if log:
            log(f"train {method}: {row['sec_per_step']:.4f} s/step, {row['peak_memory_bytes'] / 2**20:.0f} MB")

    gen_configs = [("base", {}, False)]
    for rank in gen_ranks:
        gen_configs += [("lora", {"r": rank}, False), ("lora", {"r": rank}, True),
                        ("lora_diffusion", _rank_options("lora_diffusion", rank), False)]
    gen_configs += [(m, {}, False) for m in others if m in ("adapter", "prefix")]
    gen_rows = []
    for method, options, merged in gen_configs:
        row = profile_generation(method, options, merged=merged, batch_sizes=gen_batch_sizes, lengths=gen_lengths,
                                 steps=gen_steps, repeats=gen_repeats, **common)
        gen_rows.append({**row, "rank": options.get("r", options.get("rank"))})
        if log:
            log(f"generate {method} {options} merged={merged}: done")
    return {"analysis": "rank_scaling", "ranks": list(ranks), "train_batch": {
                "batch_size": batch_size, "prompt_length": prompt_length, "response_length": response_length,
                "steps": steps, "warmup": warmup},
            "generation": {"batch_sizes": list(gen_batch_sizes), "lengths": list(gen_lengths), "steps": gen_steps,
                           "repeats": gen_repeats},
            "train": train_rows, "generate": gen_rows}
