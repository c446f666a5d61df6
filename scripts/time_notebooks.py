"""Time every teaching notebook top to bottom: results/notebook_timings.json.

    .venv/bin/lora-diffusion lessons                  # once: the adapters the notebooks load
    .venv/bin/python scripts/time_notebooks.py        # then: every notebook, timed

Each notebook runs as "Restart & run all" runs it: in a fresh kernel (nbclient), from the
notebooks/ folder, on the base the notebooks use (the shipped one, or LORA_DIFFUSION_BASE).
The file records the seconds per notebook against the goal (3 minutes each), the machine's
cores and load average, the date, the base, and whether the lessons cache was warm before
each notebook. Exit status 1 if a notebook fails or runs past the goal.

--fast runs them on a tiny random base with a few steps and a throwaway lessons cache (what
CI checks) and writes the file only where --out says.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GOAL_SECONDS = 180


def use_tiny_base(folder: Path) -> None:
    """Point the notebooks (their kernels inherit the environment) at a tiny random base, a few steps."""
    from lora_diffusion.backbone import tiny_backbone

    tiny = tiny_backbone(seed=0)
    tiny.mlm.save_pretrained(folder / "base")
    tiny.tokenizer.save_pretrained(folder / "base")
    os.environ.update(LORA_DIFFUSION_BASE=str(folder / "base"), LORA_DIFFUSION_LESSONS=str(folder / "lessons"),
                      NOTEBOOK_STEPS="4")


def _shown(path: Path) -> str:
    """A folder as the committed results file names it: inside the checkout or the home folder, relative to it
    (no machine's own folders in the file)."""
    path = path.resolve()
    for top, shown in ((ROOT, ""), (Path.home().resolve(), "~/")):
        if path.is_relative_to(top):
            return shown + path.relative_to(top).as_posix()
    return str(path)


def time_notebook(path: Path, base: str) -> dict:
    import nbclient
    import nbformat

    from lora_diffusion import lessons

    row = {"notebook": path.stem, "cache_warm_before": lessons.is_warm(base),
           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    notebook = nbformat.read(path, as_version=4)
    began = time.perf_counter()
    try:
        nbclient.NotebookClient(notebook, timeout=3600, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        row["error"] = None
    except nbclient.exceptions.CellExecutionError as err:
        row["error"] = f"{err.ename}: {err.evalue}"
    row["seconds"] = round(time.perf_counter() - began, 1)
    row["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    row["within_goal"] = row["error"] is None and row["seconds"] <= GOAL_SECONDS
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the JSON file (default: results/notebook_timings.json; with --fast: none)")
    parser.add_argument("--fast", action="store_true", help="a tiny random base with a few steps (CI's check)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these notebooks, e.g. 02_effective_rank")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.only:
        unknown = set(args.only) - {p.stem for p in paths}
        if unknown:
            parser.error(f"no notebook {', '.join(sorted(unknown))}; there are {', '.join(p.stem for p in paths)}")
        paths = [p for p in paths if p.stem in args.only]
    if args.fast:
        use_tiny_base(Path(tempfile.mkdtemp(prefix="notebook-timings-")))
    out = args.out or (None if args.fast else ROOT / "results" / "notebook_timings.json")

    import torch

    from lora_diffusion import lessons
    from lora_diffusion.backbone import load_backbone
    from lora_diffusion.files import write_json
    from lora_diffusion.paths import lessons_dir

    base = os.environ.get("LORA_DIFFUSION_BASE")  # None: the shipped base
    backbone = load_backbone(base)
    report = {
        "what": "seconds per teaching notebook, top to bottom in a fresh kernel (scripts/time_notebooks.py)",
        "goal_seconds": GOAL_SECONDS,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "base": {"source": backbone.label, "fingerprint": backbone.fingerprint()},
        "notebook_steps": os.environ.get("NOTEBOOK_STEPS"),  # None: each lesson's own budget
        "lessons_cache": _shown(lessons_dir()),
        "cache_warm_at_start": lessons.is_warm(base),
        "notebooks": [],
    }
    for path in paths:
        row = time_notebook(path, base)
        report["notebooks"].append(row)
        print(f"{row['notebook']:<32} {row['seconds']:7.1f} s  cache {'warm' if row['cache_warm_before'] else 'cold'}"
              f"  load {row['load_average_before'][0]:.1f}" + (f"  ERROR {row['error']}" if row["error"] else ""),
              flush=True)
    report["all_within_goal"] = all(row["within_goal"] for row in report["notebooks"])
    if out:
        write_json(out, report)
        print(f"wrote {out}")
    return 0 if report["all_within_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
