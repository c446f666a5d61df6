"""Forgetting: held-out NELBO of generic text under each fine-tuned model against the base.

The text is what `prepare-base` held out (WikiText-2 `test.txt`, the last fifth of the
TinyStories validation sample), packed into rows of `seq_len` tokens; every token is a
response token (no prompt), so a step-aware method sees the whole trajectory. A method
whose perturbation depends on the instruction gets none here (plain text has none).
Lower is better; the change against the base is the forgetting.
"""

from __future__ import annotations

import torch

from ..adapters import adapter_label, load_adapter
from ..backbone import load_backbone
from ..data import pack_text, text_batches, text_corpus
from ..diffusion import DiffusionLM, nelbo


def heldout_text_rows(data_dir, tokenizer, seq_len: int = 128, rows: int = 64, seed: int = 0) -> dict:
    """source -> [rows, seq_len] token ids of the base's held-out text."""
    _, heldout = text_corpus(data_dir)
    out = {}
    for source, texts in sorted(heldout.items()):
        packed = pack_text(tokenizer, texts, seq_len)
        pick = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed + 1))[:rows]
        out[source] = packed[pick.sort().values]
    return out


def forgetting_report(adapters, base=None, data_dir=None, seq_len: int = 128, rows: int = 64,
                      samples_per_sequence: int = 4, seed: int = 0) -> dict:
    """NELBO (nats/token) and perplexity bound per text source, for the base and every adapter."""
    base_model = DiffusionLM(load_backbone(base)).eval()
    texts = heldout_text_rows(data_dir, base_model.backbone.tokenizer, seq_len, rows, seed)

    def score(model) -> dict:
        return {source: nelbo(model, text_batches(r, 16), samples_per_sequence, seed) for source, r in texts.items()}

    base_scores = score(base_model)
    models = [{"label": "base", "method": "base", "scores": base_scores}]
    for path in adapters:
        model, _, config = load_adapter(path, base=base)
        scores = score(model)
        models.append({"label": f"{config['method']} ({adapter_label(path)})", "method": config["method"],
                       "task": config["task"]["name"], "scores": scores,
                       "delta_nelbo": {s: scores[s]["nelbo"] - base_scores[s]["nelbo"] for s in scores}})
    return {"analysis": "forgetting", "seq_len": seq_len, "rows_per_source": rows,
            "samples_per_sequence": samples_per_sequence, "sources": sorted(texts), "models": models}
