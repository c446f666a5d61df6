"""Held-out metrics.

* generative accuracy: the sampler decodes the response from all-[MASK]; exact match
  of the answer tokens (up to the first [SEP]) with the reference;
* verbalizer accuracy: argmax over the label words of their log-likelihood under one
  denoiser call on the all-[MASK] response (t = 1), summed over the response positions;
* generation tasks: ROUGE-L (LCS F-measure) and token F1 on the decoded words;
* plain text: the NELBO / perplexity bound (see `diffusion.nelbo`).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .data import Encoded, Task, collate, encode, response_length_for
from .diffusion import DiffusionLM, sample


def answer_ids(ids: list[int], sep_id: int) -> list[int]:
    """The answer part of a response: everything before the first [SEP]."""
    return ids[: ids.index(sep_id)] if sep_id in ids else ids


def lcs_length(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 of two word lists."""
    if not prediction or not reference:
        return float(prediction == reference)
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """SQuAD-style bag-of-words F1."""
    if not prediction or not reference:
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def _length_sorted_batches(enc: Encoded, batch_size: int):
    order = sorted(range(len(enc.prompts)), key=lambda i: len(enc.prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def verbalizer_predictions(model: DiffusionLM, enc: Encoded, labels: list[str], batch_size: int = 64) -> list[str]:
    """Label with the highest likelihood under one t=1 denoiser call, per example."""
    backbone = model.backbone
    tok, sep = backbone.tokenizer, backbone.sep_id
    label_ids = [(tok(w, add_special_tokens=False)["input_ids"] + [sep] * enc.response_length)[:enc.response_length]
                 for w in labels]
    label_ids = torch.tensor(label_ids)  # [C, R]
    device = next(model.parameters()).device
    preds: list[str] = [""] * len(enc.prompts)
    for idx in _length_sorted_batches(enc, batch_size):
        batch = {k: v.to(device) for k, v in collate(enc, idx, backbone.pad_id, backbone.mask_id).items()}
        t = torch.ones(len(idx), device=device)
        logits = model(batch["input_ids"], batch["attention_mask"], t, batch["instruction"],
                       positions=batch["response_mask"])
        logp = logits.float().log_softmax(-1).view(len(idx), enc.response_length, -1).cpu()
        # score[b, c] = sum_r log p(label_c token r at position r)
        gathered = logp.gather(2, label_ids.T[None].expand(len(idx), -1, -1))  # [B, R, C]
        scores = gathered.sum(1)
        for row, i in enumerate(idx):
            preds[i] = labels[int(scores[row].argmax())]
    return preds


@torch.no_grad()
def generate(model: DiffusionLM, enc: Encoded, batch_size: int = 64, steps: int = 64,
             remasking: str = "low_confidence", seed: int = 0, temperature: float = 0.0,
             block_length: int | None = None) -> list[list[int]]:
    """Sampled answer token ids (up to the first [SEP]) for every example of `enc`."""
    backbone = model.backbone
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in enc.prompts]
    for idx in _length_sorted_batches(enc, batch_size):
        batch = {k: v.to(device) for k, v in collate(enc, idx, backbone.pad_id).items()}
        tokens, _ = sample(model, **batch, steps=steps, remasking=remasking, temperature=temperature,
                           block_length=block_length, generator=generator)
        for row, i in enumerate(idx):
            ids = tokens[row][batch["response_mask"][row]].tolist()
            out[i] = answer_ids(ids, backbone.sep_id)
    return out


def evaluate_task(model: DiffusionLM, task: Task, split: str = "eval", response_length: int | None = None,
                  max_length: int | None = None, batch_size: int = 64, steps: int = 64,
                  remasking: str = "low_confidence", seed: int = 0, truncate: bool = True,
                  max_examples: int | None = None, return_predictions: bool = False) -> dict:
    """Held-out metrics of `model` on `task` (its eval split unless told otherwise)."""
    backbone = model.backbone
    tok = backbone.tokenizer
    examples = getattr(task, split)[:max_examples] if max_examples else getattr(task, split)
    response_length = response_length or response_length_for(tok, task.train)
    enc = encode(tok, examples, response_length, max_length or backbone.max_length, truncate=truncate,
                 where=f"{task.name} {split}")
    was_training = model.training
    model.eval()
    generated = generate(model, enc, batch_size, steps, remasking, seed)
    references = [answer_ids(r, backbone.sep_id) for r in enc.responses]
    decoded = [tok.decode(g) for g in generated]
    result = {"task": task.name, "n_eval": len(examples), "split": split, "steps": steps,
              "remasking": remasking, "response_length": response_length}
    exact = [g == r for g, r in zip(generated, references)]
    if task.kind == "classification":
        result["accuracy"] = sum(exact) / len(exact)
        verbal = verbalizer_predictions(model, enc, task.labels, batch_size)
        gold = [ex["response"] for ex in examples]
        result["verbalizer_accuracy"] = sum(p == g for p, g in zip(verbal, gold)) / len(gold)
        counts = Counter(decoded)
        result["invalid_rate"] = sum(c for w, c in counts.items() if w not in task.labels) / len(decoded)
        result["chance"] = max(Counter(gold).values()) / len(gold)
    else:
        words = [d.split() for d in decoded]
        ref_words = [tok.decode(r).split() for r in references]
        result["exact_match"] = sum(exact) / len(exact)
        result["rouge_l"] = sum(rouge_l(p, r) for p, r in zip(words, ref_words)) / len(words)
        result["token_f1"] = sum(token_f1(p, r) for p, r in zip(words, ref_words)) / len(words)
    if enc.n_truncated:
        result["n_truncated"] = enc.n_truncated
    if return_predictions:
        result["predictions"] = [{"input": ex["input"], "reference": ex["response"], "prediction": d}
                                 for ex, d in zip(examples, decoded)]
    model.train(was_training)
    return result


# Metrics that a summary over seeds reports as mean ± std (whichever a result has).
SEED_METRICS = ("accuracy", "verbalizer_accuracy", "invalid_rate", "exact_match", "rouge_l", "token_f1")


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of a list."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": values}


def aggregate_seeds(results: list[dict]) -> dict:
    """One summary of the same run repeated over seeds: metrics as mean ± std (sample std)."""
    first = results[0]
    summary = {key: first.get(key) for key in ("task", "method", "n_eval", "n_train", "steps", "base", "source")}
    summary["seeds"] = [r["seed"] for r in results]
    for key in SEED_METRICS:
        if key in first:
            summary[key] = mean_std([r[key] for r in results])
    summary["train_steps"] = first["train"]["steps"]
    summary["batch_size"] = first["config"]["batch_size"]
    summary["trainable_parameters"] = first.get("trainable_parameters")
    summary["train_seconds"] = mean_std([r["train"]["train_seconds"] for r in results])  # this process only
    if all("logged_train_seconds" in r["train"] for r in results):  # the whole run, across resumes
        summary["logged_train_seconds"] = mean_std([r["train"]["logged_train_seconds"] for r in results])
    if all(r["train"].get("final_train_loss") is not None for r in results):
        summary["final_train_loss"] = mean_std([r["train"]["final_train_loss"] for r in results])
    summary["runs"] = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    return summary


def _cell(value) -> str:
    """A metric as text: mean ± std over seeds, or a single value, in percent."""
    if isinstance(value, dict):
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    return "" if value is None else f"{100 * value:.1f}"


def markdown_table(results: list[dict]) -> str:
    """Results or seed summaries (from `train --results`) as one markdown table."""
    rows = ["| task | method | seeds | train examples | steps × batch | held-out examples "
            "| generative acc. % | verbalizer acc. % | ROUGE-L % |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seeds = r.get("seeds", [r.get("seed")])
        steps = r.get("train_steps") or r.get("train", {}).get("steps")
        batch = r.get("batch_size") or r.get("config", {}).get("batch_size")
        rows.append(f"| {r['task']} | {r['method']} | {','.join(map(str, seeds))} | {r.get('n_train')} "
                    f"| {steps} × {batch} | {r.get('n_eval')} | {_cell(r.get('accuracy'))} "
                    f"| {_cell(r.get('verbalizer_accuracy'))} | {_cell(r.get('rouge_l'))} |")
    return "\n".join(rows)
