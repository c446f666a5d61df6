"""Held-out metrics.

* generative accuracy: the sampler decodes the response from all-[MASK]; exact match
  of the answer tokens (up to the first [SEP]) with the reference;
* verbalizer accuracy: argmax over the label words of their log-likelihood under one
  denoiser call on the all-[MASK] response (t = 1), summed over the response positions;
* generation tasks: ROUGE-L (LCS F-measure) and token F1 on the decoded words;
* plain text: the NELBO / perplexity bound (see `diffusion.nelbo`).
"""

from __future__ import annotations

from collections import Counter

import torch

from .data import Encoded, Task, answer_ids, collate, encode, response_ids, response_length_for
from .diffusion import DiffusionLM, sample
from .metrics import rouge_l, token_f1


def _length_sorted_batches(enc: Encoded, batch_size: int):
    order = sorted(range(len(enc.prompts)), key=lambda i: len(enc.prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def verbalizer_predictions(model: DiffusionLM, enc: Encoded, labels: list[str], batch_size: int = 64,
                           before_batch=None) -> list[str]:
    """Label with the highest likelihood under one t=1 denoiser call, per example
    (`before_batch(indices)` runs before each batch: a mixed batch assigns its rows there)."""
    backbone = model.backbone
    tok, sep = backbone.tokenizer, backbone.sep_id
    label_ids = [response_ids(tok(w, add_special_tokens=False)["input_ids"], sep, enc.response_length)
                 for w in labels]
    label_ids = torch.tensor(label_ids)  # [C, R]
    device = next(model.parameters()).device
    preds: list[str] = [""] * len(enc.prompts)
    for idx in _length_sorted_batches(enc, batch_size):
        if before_batch:
            before_batch(idx)
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
             block_length: int | None = None, threshold: float | None = None, before_batch=None) -> list[list[int]]:
    """Sampled answer token ids (up to the first [SEP]) for every example of `enc`."""
    backbone = model.backbone
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in enc.prompts]
    for idx in _length_sorted_batches(enc, batch_size):
        if before_batch:
            before_batch(idx)
        batch = {k: v.to(device) for k, v in collate(enc, idx, backbone.pad_id).items()}
        tokens, _ = sample(model, **batch, steps=steps, remasking=remasking, temperature=temperature,
                           block_length=block_length, generator=generator, threshold=threshold)
        for row, i in enumerate(idx):
            ids = tokens[row][batch["response_mask"][row]].tolist()
            out[i] = answer_ids(ids, backbone.sep_id)
    return out


def evaluate_task(model: DiffusionLM, task: Task, split: str = "eval", response_length: int | None = None,
                  max_length: int | None = None, batch_size: int = 64, steps: int = 64,
                  remasking: str = "low_confidence", seed: int = 0, truncate: bool = True,
                  max_examples: int | None = None, return_predictions: bool = False,
                  threshold: float | None = None) -> dict:
    """Held-out metrics of `model` on `task` (its eval split unless told otherwise).

    `threshold`: decode in parallel (see `sample`) instead of `steps` fixed steps.
    `model_calls` is the mean number of denoiser calls a batch of generation took.
    """
    examples, enc = _encoded(model, task, split, response_length, max_length, truncate, max_examples)
    was_training = model.training
    model.eval()
    calls_before = model.sampler_calls
    generated = generate(model, enc, batch_size, steps, remasking, seed, threshold=threshold)
    calls = (model.sampler_calls - calls_before) / max(1, len(_length_sorted_batches(enc, batch_size)))
    result = _scores(model, task, split, enc, examples, generated, steps, remasking, calls, threshold, batch_size,
                     return_predictions)
    model.train(was_training)
    return result


def evaluate_mixed(model: DiffusionLM, assign, n_adapters: int, task: Task, split: str = "eval",
                   response_length: int | None = None, max_length: int | None = None, batch_size: int = 64,
                   steps: int = 64, remasking: str = "low_confidence", seed: int = 0, truncate: bool = True,
                   max_examples: int | None = None, threshold: float | None = None,
                   return_predictions: bool = False) -> list[dict]:
    """`evaluate_task` for `n_adapters` adapters sharing one model, decoded in mixed batches:
    every example once per adapter, `assign(rows)` giving each row of a batch its adapter
    (e.g. `MixedAdapters.assign`). One result per adapter."""
    examples, enc = _encoded(model, task, split, response_length, max_length, truncate, max_examples)
    n = len(examples)
    every = Encoded(enc.prompts * n_adapters, enc.responses * n_adapters, enc.instructions * n_adapters,
                    enc.response_length, enc.n_truncated)
    was_training = model.training
    model.eval()
    calls_before = model.sampler_calls
    generated = generate(model, every, batch_size, steps, remasking, seed, threshold=threshold,
                         before_batch=lambda idx: assign([i // n for i in idx]))
    calls = (model.sampler_calls - calls_before) / max(1, len(_length_sorted_batches(every, batch_size)))
    results = []
    for j in range(n_adapters):
        assign_all = lambda idx, j=j: assign([j] * len(idx))  # the verbalizer pass, adapter by adapter
        results.append(_scores(model, task, split, enc, examples, generated[j * n:(j + 1) * n], steps, remasking,
                               calls, threshold, batch_size, return_predictions, assign_all))
    model.train(was_training)
    return results


def _encoded(model, task, split, response_length, max_length, truncate, max_examples):
    tok = model.backbone.tokenizer
    examples = getattr(task, split)[:max_examples] if max_examples else getattr(task, split)
    response_length = response_length or response_length_for(tok, task.train)
    return examples, encode(tok, examples, response_length, max_length or model.backbone.max_length,
                            truncate=truncate, where=f"{task.name} {split}")


def _scores(model, task, split, enc, examples, generated, steps, remasking, calls, threshold, batch_size,
            return_predictions, before_batch=None) -> dict:
    """The result dict of one model's answers `generated` to the encoded `examples`."""
    tok = model.backbone.tokenizer
    decoded = [tok.decode(g) for g in generated]
    result = {"task": task.name, "kind": task.kind, "n_eval": len(examples), "split": split, "steps": steps,
              "remasking": remasking, "response_length": enc.response_length, "model_calls": calls}
    if threshold is not None:
        result["threshold"] = threshold
    if task.kind == "classification":
        result.update(_classification_scores(model, task, enc, examples, generated, decoded, batch_size,
                                             before_batch))
    else:
        result.update(_generation_scores(tok, enc, generated, decoded))
    if enc.n_truncated:
        result["n_truncated"] = enc.n_truncated
    if return_predictions:
        result["predictions"] = [{"input": ex["input"], "reference": ex["response"], "prediction": d}
                                 for ex, d in zip(examples, decoded)]
    return result


def _classification_scores(model, task, enc, examples, generated, decoded, batch_size, before_batch=None) -> dict:
    """Generative accuracy (exact match of the answer tokens), verbalizer accuracy, invalid rate, chance."""
    references = [answer_ids(r, model.backbone.sep_id) for r in enc.responses]
    gold = [ex["response"] for ex in examples]
    verbal = verbalizer_predictions(model, enc, task.labels, batch_size, before_batch)
    counts = Counter(decoded)
    return {"accuracy": sum(g == r for g, r in zip(generated, references)) / len(generated),
            "verbalizer_accuracy": sum(p == g for p, g in zip(verbal, gold)) / len(gold),
            "invalid_rate": sum(c for w, c in counts.items() if w not in task.labels) / len(decoded),
            "chance": max(Counter(gold).values()) / len(gold)}


def _generation_scores(tok, enc, generated, decoded) -> dict:
    """Exact match, ROUGE-L and token F1 of the decoded words against the references."""
    references = [answer_ids(r, tok.sep_token_id) for r in enc.responses]
    words = [d.split() for d in decoded]
    ref_words = [tok.decode(r).split() for r in references]
    return {"exact_match": sum(g == r for g, r in zip(generated, references)) / len(generated),
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(words, ref_words)) / len(words),
            "token_f1": sum(token_f1(p, r) for p, r in zip(words, ref_words)) / len(words)}
