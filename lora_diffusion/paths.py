"""Where the project's own files are: the shipped base, the built-in suite, the real data, results.

Installed from a wheel, the assets sit inside the package (`lora_diffusion/assets/`); in a
checkout they sit beside it (`assets/`). Environment variables override each location:
LORA_DIFFUSION_BASE (the shipped base), LORA_DIFFUSION_DATA (the real datasets),
LORA_DIFFUSION_LESSONS (the notebooks' cached adapters).
LORA_DIFFUSION_TRUST_REMOTE_CODE=1 (what `--trust-remote-code` sets) lets a base folder
run its own Python code.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# A checkout has pyproject.toml beside the package; an installed wheel does not.
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None
ASSETS = PACKAGE / "assets" if (PACKAGE / "assets").is_dir() else PACKAGE.parent / "assets"

SHIPPED_BASE = Path(os.environ.get("LORA_DIFFUSION_BASE", ASSETS / "base"))
SUITE_DIR = ASSETS / "suite"
TRUST_REMOTE_CODE = "LORA_DIFFUSION_TRUST_REMOTE_CODE"


def remote_code_trusted() -> bool:
    return os.environ.get(TRUST_REMOTE_CODE) == "1"


def default_data_dir() -> Path | None:
    """The folder of the real datasets (layout of shared/data): LORA_DIFFUSION_DATA, else the
    `shared/data` beside a checkout; None for an installed package without one."""
    if "LORA_DIFFUSION_DATA" in os.environ:
        return Path(os.environ["LORA_DIFFUSION_DATA"])
    return CHECKOUT.parent / "shared" / "data" if CHECKOUT else None


def lessons_dir() -> Path:
    """The cache of the adapters the teaching notebooks use (`lessons.py`): LORA_DIFFUSION_LESSONS,
    else runs/lessons in a checkout, else ~/.cache/lora-diffusion/lessons."""
    if "LORA_DIFFUSION_LESSONS" in os.environ:
        return Path(os.environ["LORA_DIFFUSION_LESSONS"])
    return CHECKOUT / "runs" / "lessons" if CHECKOUT else Path.home() / ".cache" / "lora-diffusion" / "lessons"
