"""Shared fixtures: a tiny random base (seconds to build) and helpers to write small files."""

import os
from pathlib import Path

import pytest
import torch

from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.diffusion import DiffusionLM

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    return tiny_backbone(seed=0)


@pytest.fixture
def tiny_model(tiny):
    return DiffusionLM(tiny)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tiny):
    """The tiny random base saved as a model folder, as a user's --base would be."""
    folder = tmp_path_factory.mktemp("tiny_base")
    tiny.mlm.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
