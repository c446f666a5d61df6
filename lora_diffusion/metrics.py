"""Scores: ROUGE-L and token F1 of word lists, a task's primary metric, mean ± std over seeds.

Pure functions of plain data; `evaluate.py` produces what they score.
"""

from __future__ import annotations

import math
from collections import Counter

# Metrics that a summary over seeds reports as mean ± std (whichever a result has).
SEED_METRICS = ("accuracy", "verbalizer_accuracy", "invalid_rate", "exact_match", "rouge_l", "token_f1")


def primary_metric(kind: str) -> str:
    """The headline metric of a task kind: accuracy for classification, ROUGE-L for generation."""
    return "accuracy" if kind == "classification" else "rouge_l"


def reported_metrics(kind: str) -> tuple[str, str]:
    """The headline metric of a task kind and the one shown beside it."""
    primary = primary_metric(kind)
    return primary, {"accuracy": "verbalizer_accuracy", "rouge_l": "token_f1"}[primary]


def metric_of(result: dict) -> str:
    """The primary metric a result (or a row of seed summaries) carries."""
    return primary_metric("classification" if "accuracy" in result else "generation")


def score(result: dict) -> float:
    """A result's primary score; for a summary over seeds, its mean."""
    value = result[metric_of(result)]
    return value["mean"] if isinstance(value, dict) else value


def lcs_length(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f1(overlap: int, prediction: list, reference: list) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 of two word lists."""
    if not prediction or not reference:
        return float(prediction == reference)
    return _f1(lcs_length(prediction, reference), prediction, reference)


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """SQuAD-style bag-of-words F1."""
    if not prediction or not reference:
        return float(prediction == reference)
    return _f1(sum((Counter(prediction) & Counter(reference)).values()), prediction, reference)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of a list."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": values}


def over_seeds(results: list[dict]) -> dict:
    """Every held-out metric the runs of one configuration report, as mean ± std over them."""
    return {key: mean_std([r[key] for r in results]) for key in SEED_METRICS if key in results[0]}


def percent(value, digits: int = 1) -> str:
    """A metric as text in percent: mean ± std for a summary over seeds (the mean alone for one
    seed: a spread of one run is not a measurement), else the value ('' for None)."""
    if isinstance(value, dict):
        if value.get("n", 2) < 2:
            return f"{100 * value['mean']:.{digits}f}"
        return f"{100 * value['mean']:.{digits}f} ± {100 * value['std']:.{digits}f}"
    return "" if value is None else f"{100 * value:.{digits}f}"
