"""The adapters and runs the teaching notebooks use, trained once into a cache.

The notebooks in `notebooks/` teach with adapters that take minutes to train on a CPU.
`lora-diffusion lessons` (`build`) trains every one of them on the built-in suite into
the lessons folder (`paths.lessons_dir()`), in one subfolder per base (an adapter loads
only on the base it was trained on), and skips those already there. A notebook asks for
what it needs with `adapters` and `compare`: what is cached is read back, what is not is
trained there and then by the same code (slower; a printed line says so).

NOTEBOOK_STEPS, where set, replaces every step budget here: CI runs the notebooks on a
tiny random base with a few steps.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

from .backbone import load_backbone
from .data import SUITE_TASKS
from .paths import SHIPPED_BASE, lessons_dir

ADAPTER_STEPS = 200  # each lesson adapter, batch 16: what the suite's tasks need on the shipped base
ADAPTER_EVAL = 100   # held-out examples each is scored on when trained (the score it prints)
ADAPTERS = [(task, method) for method in ("lora_diffusion", "lora") for task in SUITE_TASKS]  # notebooks 02-04
# Notebook 05's comparison: the methods and seeds its widgets start with, an equal budget for each.
COMPARE = {"task": "suite_sentiment", "methods": ("full", "lora_diffusion", "lora", "bitfit"), "seeds": (0, 1),
           "steps": 100, "max_eval": 200}
SAMPLER_STEPS = 8    # denoising steps of every held-out score here


def steps(default: int) -> int:
    """A lesson's step budget: `default`, or NOTEBOOK_STEPS where set (CI)."""
    return int(os.environ.get("NOTEBOOK_STEPS", default))


@lru_cache(maxsize=None)
def _fingerprint(base: str) -> str:
    return load_backbone(base).fingerprint()


def cache_dir(base=None) -> Path:
    """This base's folder of the lessons cache (named by the base's fingerprint)."""
    return lessons_dir() / _fingerprint(str(base or SHIPPED_BASE))


def run_folder(task: str, method: str, n_steps: int, base=None) -> Path:
    return cache_dir(base) / f"{method}-{task}-{n_steps}steps"


def adapters(pairs, n_steps: int | None = None, base=None, data_dir=None) -> list[Path]:
    """The run folders of a lesson adapter per (task, method), trained first where not cached."""
    n_steps = steps(ADAPTER_STEPS) if n_steps is None else n_steps
    return [_adapter(task, method, n_steps, base, data_dir) for task, method in pairs]


def _adapter(task: str, method: str, n_steps: int, base, data_dir) -> Path:
    from .runs import train_adapter

    folder = run_folder(task, method, n_steps, base)
    if (folder / "results.json").is_file():  # written last by fine_tune: the run is complete
        return folder
    print(f"{method} on {task} is not in the lessons cache: training it now ({n_steps} steps; "
          "`lora-diffusion lessons` trains every lesson adapter once)", flush=True)
    partial = folder.with_name(folder.name + ".partial")  # a killed run leaves no half adapter in the cache
    shutil.rmtree(partial, ignore_errors=True)
    train_adapter(task, method, out_dir=partial, steps=n_steps, data_dir=data_dir, max_eval=ADAPTER_EVAL,
                  sampler_steps=SAMPLER_STEPS, base=base, checkpoint_every=0)
    partial.rename(folder)
    return folder


def compare_folder(task: str, n_steps: int, base=None) -> Path:
    return cache_dir(base) / f"compare-{task}-{n_steps}steps"


def compare(task: str, methods, seeds, n_steps: int | None = None, base=None, data_dir=None) -> dict:
    """`compare.run_compare` of `methods` x `seeds` on `task` with an equal budget, its runs kept in
    the cache (runs already there are read back, the others trained now)."""
    from .compare import run_compare, specs_from
    from .data import load_task
    from .training import TrainConfig

    n_steps = steps(COMPARE["steps"]) if n_steps is None else n_steps
    folder = compare_folder(task, n_steps, base)
    if not _compared(folder, methods, seeds):
        print(f"some runs of this comparison are not in the lessons cache: training them now ({n_steps} steps "
              "each; `lora-diffusion lessons` trains the default ones once)", flush=True)
    return run_compare(load_task(task, data_dir=data_dir, max_eval=COMPARE["max_eval"]),
                       specs_from(methods=list(methods)), seeds=list(seeds),
                       config=TrainConfig(steps=n_steps, checkpoint_every=0), out_dir=folder, base=base,
                       sampler_steps=SAMPLER_STEPS, profile=False, progress=False, log=print)


def _compared(folder: Path, methods, seeds) -> bool:
    """Whether the comparison in `folder` already holds a finished run of every method with every seed
    (each run's own results.json: the folder's table is rewritten by whichever comparison ran last)."""
    from .compare import seed_folder, specs_from

    return all((seed_folder(folder, spec, seed) / "results.json").is_file()
               for spec in specs_from(methods=list(methods)) for seed in seeds)


def is_warm(base=None) -> bool:
    """Whether every default lesson adapter and comparison run is cached for this base (and budget)."""
    n_steps = steps(ADAPTER_STEPS)
    return (all((run_folder(t, m, n_steps, base) / "results.json").is_file() for t, m in ADAPTERS)
            and _compared(compare_folder(COMPARE["task"], steps(COMPARE["steps"]), base),
                          COMPARE["methods"], COMPARE["seeds"]))


def build(base=None) -> dict:
    """Train every lesson adapter and comparison run not yet cached; returns where they are."""
    folders = adapters(ADAPTERS, base=base)
    compare(COMPARE["task"], COMPARE["methods"], COMPARE["seeds"], base=base)
    return {"cache": str(cache_dir(base)), "adapters": [str(f) for f in folders],
            "compare": str(compare_folder(COMPARE["task"], steps(COMPARE["steps"]), base))}
