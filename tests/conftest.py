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


def perturb(method, seed=1):
    """Give every trainable tensor a random value, so zero-init parts (up, B, gates) are not zero any more."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def logits(model, batch, t=0.5):
    """The model's logits at the batch's response positions, at time t (a number, or one per row)."""
    t = torch.full((batch["input_ids"].shape[0],), t) if isinstance(t, float) else t
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], t, batch["instruction"],
                     positions=batch["response_mask"])


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_batch(tiny, n=4, prompt_len=6, response_len=5, seed=0, padded=False):
    """A random batch in the task layout: prompt, then response; `padded` pads the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, prompt_len + response_len), generator=g)
    ids[:, 0] = tiny.cls_id
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_len:] = True
    attention = torch.ones_like(ids)
    if padded:  # the last row is two tokens shorter: its last two positions are padding
        ids[-1, -2:] = tiny.pad_id
        attention[-1, -2:] = 0
        response[-1, -2:] = False
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response,
            "instruction": ids[:, 1:3]}
