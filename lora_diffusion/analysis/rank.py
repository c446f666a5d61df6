"""Effective rank of each method's perturbation at every denoising step (the paper's Figure 2).

For every adapter: sample its task's held-out examples with `steps` denoising steps and,
at each step, stack the per-token perturbations of the final hidden states over the
batch (see `trajectories.py`) and take exp(entropy of the normalised singular values).
The paper claims early (high-noise) steps need higher rank; this measures it.
"""

from __future__ import annotations

from pathlib import Path

from .trajectories import effective_rank_per_step, perturbation_trajectories


def load_for_analysis(adapters, base=None, task_name=None, data_dir=None, n_examples=64, seed=0):
    """(base model, [(label, model, method, config, task, encoded examples)]) for saved adapters.

    Every adapter is scored on its own task's held-out split (or on `task_name`), the same
    `n_examples` examples for every adapter of one task.
    """
    from ..backbone import load_backbone
    from ..data import encode, load_task
    from ..diffusion import DiffusionLM
    from ..io import load_adapter

    base_model = DiffusionLM(load_backbone(base)).eval()
    loaded, tasks = [], {}
    for path in adapters:
        model, method, config = load_adapter(path, base=base)
        name = task_name or config["task"]["name"]
        if name not in tasks:
            tasks[name] = load_task(name, data_dir=data_dir, max_eval=n_examples, seed=seed)
        task = tasks[name]
        enc = encode(model.backbone.tokenizer, task.eval, config["response_length"], config["max_length"],
                     truncate=True)
        label = f"{config['method']} ({Path(path).name})" if Path(path).name not in ("adapter",) else \
            f"{config['method']} ({Path(path).parent.name})"
        loaded.append((label, model, method, config, task, enc))
    return base_model, loaded


def effective_rank_report(adapters, base=None, task_name=None, data_dir=None, n_examples=64, steps=16,
                          seed=0) -> dict:
    """{"steps": T, "methods": [{label, method, task, t, effective_rank, mean_norm, rows, source}]}"""
    base_model, loaded = load_for_analysis(adapters, base, task_name, data_dir, n_examples, seed)
    rows = []
    for label, model, method, config, task, enc in loaded:
        trajectory = perturbation_trajectories(model, base_model, enc, steps=steps, seed=seed)
        rows.append({"label": label, "method": config["method"], "options": config["options"],
                     "task": task.name, "n_examples": len(enc.prompts), **effective_rank_per_step(trajectory)})
    return {"analysis": "effective_rank_per_step", "steps": steps, "seed": seed, "methods": rows,
            "measure": "exp(entropy of normalised singular values) of the stacked per-token perturbations "
                       "of the final hidden states at the response positions, per sampler step"}


def effective_rank_figure(report: dict):
    """One line per method: effective rank against the step's t (high noise on the left)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for row in report["methods"]:
        fig.add_trace(go.Scatter(x=row["t"], y=row["effective_rank"], mode="lines+markers", name=row["label"],
                                 hovertemplate="t=%{x:.2f}<br>effective rank %{y:.1f}<extra>" + row["label"] + "</extra>"))
    for boundary in (1 / 3, 2 / 3):
        fig.add_vline(x=boundary, line_dash="dot", line_color="grey")
    fig.update_layout(title="Effective rank of the perturbation per denoising step",
                      xaxis_title="t (share of the response still masked; sampling runs left to right)",
                      yaxis_title="effective rank", xaxis_autorange="reversed", template="plotly_white",
                      legend_title="method")
    return fig
