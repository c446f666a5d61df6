"""Data efficiency (the paper's Figure 3): held-out accuracy against training-set size.

For each size, every method trains on the same seeded, label-stratified subset of the
training split for the same number of steps (so small sets are seen for more epochs),
from a fresh base, and is scored on the same held-out examples. Mean ± std over seeds.
"""

from __future__ import annotations

from pathlib import Path

from ..compare import Spec, run_compare
from ..data import Task, subsample
from ..metrics import SEED_METRICS
from ..training import TrainConfig


def data_efficiency_report(task: Task, sizes: list[int], methods=("lora_diffusion", "lora", "full"), seeds=(0, 1, 2),
                           config=None, out_dir=None, base=None, sampler_steps: int = 64, progress: bool = True,
                           log=print, learning_rates: dict | None = None, jobs: int = 1) -> dict:
    """One point per (size, method): held-out score mean ± std over seeds.

    `learning_rates` (method -> lr, e.g. from a sweep) replaces the methods' default rates;
    `jobs` runs that many trainings at a time (see `run_compare`).
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir or "runs/data-efficiency")
    points = []
    for size in sorted(sizes):
        sub = Task(task.name, task.kind, subsample(task.train, size, seed=0), task.eval, task.labels,
                   source=f"{task.source} ({size} training examples)", info=dict(task.info))
        result = run_compare(sub, [Spec(m, m) for m in methods], list(seeds), config, out_dir / f"n-{size}",
                             base=base, sampler_steps=sampler_steps, profile=False, progress=progress, log=log,
                             learning_rates={m: lr for m, lr in (learning_rates or {}).items() if m in methods},
                             jobs=jobs)
        for row in result["rows"]:
            points.append({"n_train": len(sub.train), "method": row["method"], "lr": row["lr"],
                           **{k: row[k] for k in SEED_METRICS if k in row}})
    return {"analysis": "data_efficiency", "task": task.describe(), "sizes": sorted(sizes), "seeds": list(seeds),
            "steps": config.steps, "batch_size": config.batch_size, "points": points}
