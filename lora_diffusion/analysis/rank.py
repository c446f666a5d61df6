"""Effective rank of each method's perturbation at every denoising step (the paper's Figure 2).

For every adapter: sample its task's held-out examples with `steps` denoising steps and,
at each step, stack the per-token perturbations of the final hidden states over the
batch (see `trajectories.py`) and take exp(entropy of the normalised singular values).
The paper claims early (high-noise) steps need higher rank; this measures it.
"""

from __future__ import annotations

from ..adapters import adapter_label, load_adapter
from ..backbone import load_backbone
from ..data import encode, load_task
from ..diffusion import PHASES, DiffusionLM, phase_name
from .trajectories import effective_rank_per_layer, effective_rank_per_step, perturbation_trajectories


def load_for_analysis(adapters, base=None, task_name=None, data_dir=None, n_examples=64, seed=0):
    """(base model, [(label, model, method, config, task, encoded examples)]) for saved adapters.

    Every adapter is scored on its own task's held-out split (or on `task_name`), the same
    `n_examples` examples for every adapter of one task.
    """
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
        loaded.append((f"{config['method']} ({adapter_label(path)})", model, method, config, task, enc))
    return base_model, loaded


def effective_rank_report(adapters, base=None, task_name=None, data_dir=None, n_examples=64, steps=16,
                          seed=0, per_layer: bool = False) -> dict:
    """{"steps": T, "methods": [{label, method, task, t, effective_rank, mean_norm, rows, source}]}

    per_layer: each row also gets "per_layer", the effective rank and mean norm of every
    block's output change (fine-tuned - base) per step: where in the body a method acts.
    """
    base_model, loaded = load_for_analysis(adapters, base, task_name, data_dir, n_examples, seed)
    rows = []
    for label, model, method, config, task, enc in loaded:
        trajectory = perturbation_trajectories(model, base_model, enc, steps=steps, seed=seed)
        rows.append({"label": label, "method": config["method"], "options": config["options"],
                     "task": task.name, "n_examples": len(enc.prompts), **effective_rank_per_step(trajectory)})
        if per_layer:
            rows[-1]["per_layer"] = effective_rank_per_layer(model, base_model, enc, steps=steps, seed=seed)
    return {"analysis": "effective_rank_per_step", "steps": steps, "seed": seed, "methods": rows,
            "measure": "exp(entropy of normalised singular values) of the stacked per-token perturbations "
                       "of the final hidden states at the response positions, per sampler step"}


def phase_means(t: list, values: list) -> dict[str, float | None]:
    """{phase: mean of the values of the steps in it} (early t > 2/3, middle, late t <= 1/3; None for
    a phase no step fell in): e.g. a row's mean effective rank per phase."""
    grouped = {phase: [v for ti, v in zip(t, values) if phase_name(ti) == phase] for phase in PHASES}
    return {phase: sum(v) / len(v) if v else None for phase, v in grouped.items()}
