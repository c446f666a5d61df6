"""Rank scaling of memory and speed (seed 000's question; review question 4).

For weight LoRA and LoRA-Diffusion (uniform rank r) at every rank, and for full
fine-tuning, adapters, BitFit and prefix tuning: trainable parameters, optimizer-state
bytes, peak training memory and train step time (`profile.profile_training`), then
sampler latency and throughput over batch sizes and response lengths, merged and
unmerged where merging exists (`profile.profile_generation`). Every point is measured
in a fresh process; medians over repeats with warm-up excluded; device and dtype are
recorded with each row.
"""

from __future__ import annotations

from .profile import profile_generation, profile_training

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
OTHERS = ("full", "adapter", "bitfit", "prefix")


def _rank_options(method: str, rank: int) -> dict:
    return {"r": rank} if method in ("lora", "dora") else {"schedule": "uniform", "rank": rank}


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


def scaling_figures(report: dict) -> dict:
    """plotly figures: parameters, optimizer state, peak memory and step time against rank; throughput."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = [("trainable_parameters", "trainable parameters", 1), ("optimizer_state_bytes", "optimizer state (MB)", 2**20),
               ("peak_memory_bytes", "peak training memory (MB)", 2**20), ("sec_per_step", "train step (s)", 1)]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[m[1] for m in metrics])
    palette = {"lora": "#1f77b4", "lora_diffusion": "#d62728", "full": "#2ca02c", "adapter": "#9467bd",
               "bitfit": "#8c564b", "prefix": "#e377c2"}
    for k, (key, title, scale) in enumerate(metrics):
        r, c = k // 2 + 1, k % 2 + 1
        for method in ("lora", "lora_diffusion"):
            rows = [row for row in report["train"] if row["method"] == method]
            fig.add_trace(go.Scatter(x=[row["rank"] for row in rows], y=[row[key] / scale for row in rows],
                                     mode="lines+markers", name=method, legendgroup=method, showlegend=k == 0,
                                     line_color=palette[method]), row=r, col=c)
        for row in report["train"]:
            if row["rank"] is None:
                fig.add_trace(go.Scatter(x=report["ranks"], y=[row[key] / scale] * len(report["ranks"]), mode="lines",
                                         line_dash="dash", line_color=palette.get(row["method"]), name=row["method"],
                                         legendgroup=row["method"], showlegend=k == 0), row=r, col=c)
        fig.update_xaxes(type="log", title_text="rank", row=r, col=c)
        fig.update_yaxes(type="log" if key != "sec_per_step" else "linear", row=r, col=c)
    device = report["train"][0]["device"] if report["train"] else "?"
    fig.update_layout(title=f"Rank scaling (training, {device})", template="plotly_white", height=700)

    gen = go.Figure()
    for row in report["generate"]:
        label = row["method"] + (f" r={row['rank']}" if row["rank"] else "") + (" merged" if row["merged"] else "")
        for length in report["generation"]["lengths"]:
            points = [p for p in row["rows"] if p["response_length"] == length]
            gen.add_trace(go.Scatter(x=[p["batch_size"] for p in points], y=[p["tokens_per_s"] for p in points],
                                     mode="lines+markers", name=f"{label}, L={length}"))
    gen.update_layout(title="Generation throughput (response tokens per second)", xaxis_type="log",
                      xaxis_title="batch size", yaxis_title="tokens / s", template="plotly_white")
    return {"training": fig, "generation": gen}
