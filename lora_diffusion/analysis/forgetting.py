"""Forgetting: held-out NELBO of generic text under each fine-tuned model against the base.

The text is what `prepare-base` held out (WikiText-2 `test.txt`, the last fifth of the
TinyStories validation sample), packed into rows of `seq_len` tokens; every token is a
response token (no prompt), so a step-aware method sees the whole trajectory. A method
whose perturbation depends on the instruction gets none here (plain text has none).
Lower is better; the change against the base is the forgetting.
"""

from __future__ import annotations

from pathlib import Path


def heldout_text_rows(data_dir=None, seq_len: int = 128, rows: int = 64, seed: int = 0, tokenizer=None) -> dict:
    """source -> [rows, seq_len] token ids of the base's held-out text."""
    import torch

    from ..backbone import load_backbone
    from ..data import DEFAULT_DATA, pack_text
    from ..prepare_base import text_corpus

    _, heldout = text_corpus(Path(data_dir or DEFAULT_DATA))
    tokenizer = tokenizer or load_backbone().tokenizer
    out = {}
    for source, texts in sorted(heldout.items()):
        packed = pack_text(tokenizer, texts, seq_len)
        pick = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed + 1))[:rows]
        out[source] = packed[pick.sort().values]
    return out


def forgetting_report(adapters, base=None, data_dir=None, seq_len: int = 128, rows: int = 64,
                      samples_per_sequence: int = 4, seed: int = 0) -> dict:
    """NELBO (nats/token) and perplexity bound per text source, for the base and every adapter."""
    from ..backbone import load_backbone
    from ..data import text_batches
    from ..diffusion import DiffusionLM, nelbo
    from ..io import load_adapter

    base_model = DiffusionLM(load_backbone(base)).eval()
    texts = heldout_text_rows(data_dir, seq_len, rows, seed, base_model.backbone.tokenizer)

    def score(model) -> dict:
        return {source: nelbo(model, text_batches(r, 16), samples_per_sequence, seed) for source, r in texts.items()}

    base_scores = score(base_model)
    models = [{"label": "base", "method": "base", "scores": base_scores}]
    for path in adapters:
        model, _, config = load_adapter(path, base=base)
        scores = score(model)
        label = Path(path).parent.name if Path(path).name == "adapter" else Path(path).name
        models.append({"label": f"{config['method']} ({label})", "method": config["method"],
                       "task": config["task"]["name"], "scores": scores,
                       "delta_nelbo": {s: scores[s]["nelbo"] - base_scores[s]["nelbo"] for s in scores}})
    return {"analysis": "forgetting", "seq_len": seq_len, "rows_per_source": rows,
            "samples_per_sequence": samples_per_sequence, "sources": sorted(texts), "models": models}


def forgetting_figure(report: dict):
    """Grouped bars: NELBO per text source for the base and each fine-tuned model."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for source in report["sources"]:
        fig.add_trace(go.Bar(name=source, x=[m["label"] for m in report["models"]],
                             y=[m["scores"][source]["nelbo"] for m in report["models"]]))
    fig.update_layout(barmode="group", template="plotly_white", yaxis_title="held-out NELBO (nats/token)",
                      title="Forgetting: generic held-out text under each model (lower is better)")
    return fig
