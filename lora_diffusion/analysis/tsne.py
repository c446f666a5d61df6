"""Two-dimensional maps of trajectories (the paper's Figure 4), with scikit-learn.

Points are (adapter, example, step): the mean over the example's response tokens of the
perturbation at that step (`trajectories.per_example`). A second map shows the base's
own hidden states on the same inputs. t-SNE is the default, PCA the fast alternative;
each map reports its trustworthiness (scikit-learn: how well the 2-D neighbourhoods
keep the original ones, 1 = perfectly).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE, trustworthiness

from ..diffusion import phase_name
from .rank import load_for_analysis
from .trajectories import per_example, perturbation_trajectories


def embed(x: np.ndarray, method: str = "tsne", perplexity: float = 30.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """2-D coordinates and their trustworthiness (n_neighbors = 5)."""
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', not {method!r}")
    if method == "pca":
        coords = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return coords, float(trustworthiness(x, coords, n_neighbors=min(5, len(x) // 2 - 1)))


def trajectory_map(adapters, base=None, task_name=None, data_dir=None, n_examples=32, steps=8,
                   method: str = "tsne", perplexity: float = 30.0, seed: int = 0) -> dict:
    """Perturbation map and base-trajectory map for saved adapters (one adapter per task, typically)."""
    vectors = trajectory_vectors(adapters, base, task_name, data_dir, n_examples, steps, seed)
    return map_vectors(vectors, method, perplexity, seed)


def trajectory_vectors(adapters, base=None, task_name=None, data_dir=None, n_examples=32, steps=8,
                       seed: int = 0) -> dict:
    """The points before any projection (the costly part: sampling with every adapter).

    {"perturbations": {"x": [n_points, d] array, "meta": [{adapter, task, example, step, t, phase}]},
     "base": the same for the base's own hidden states, once per task, "steps", "n_examples", "seed"}
    """
    base_model, loaded = load_for_analysis(adapters, base, task_name, data_dir, n_examples, seed)
    pert_x, pert_meta, base_x, base_meta, seen_tasks = [], [], [], [], set()
    for label, model, _, config, task, enc in loaded:
        trajectory = perturbation_trajectories(model, base_model, enc, steps=steps, seed=seed)
        x, keys = per_example(trajectory, "perturbation")
        pert_x.append(x.numpy())
        pert_meta += [{"adapter": label, "task": task.name, "example": e, "step": s, "t": t, "phase": phase_name(t)}
                      for e, s, t in keys]
        if task.name not in seen_tasks:  # the base's own trajectory, once per task
            seen_tasks.add(task.name)
            x, keys = per_example(trajectory, "base")
            base_x.append(x.numpy())
            base_meta += [{"task": task.name, "example": e, "step": s, "t": t, "phase": phase_name(t)}
                          for e, s, t in keys]
    return {"perturbations": {"x": np.concatenate(pert_x), "meta": pert_meta},
            "base": {"x": np.concatenate(base_x), "meta": base_meta},
            "steps": steps, "n_examples": n_examples, "seed": seed}


def map_vectors(vectors: dict, method: str = "tsne", perplexity: float = 30.0, seed: int = 0) -> dict:
    """`trajectory_vectors`' points projected to 2-D: the report `trajectory_map` returns."""
    out = {"analysis": "trajectory_map", "method": method, "steps": vectors["steps"],
           "n_examples": vectors["n_examples"], "seed": vectors["seed"]}
    for name in ("perturbations", "base"):
        coords, trust = embed(vectors[name]["x"], method, perplexity, seed)
        out[name] = {"trustworthiness": trust,
                     "points": [{**m, "x": float(c[0]), "y": float(c[1])} for m, c in zip(vectors[name]["meta"], coords)]}
    return out


def same_label_neighbours(points: list[dict], key: str = "task") -> float:
    """Share of a map's points whose nearest other point (2-D distance) has the same `key`: how well
    the map separates, e.g., tasks (1 = every neighbour alike; `same_label_chance` if they were mixed)."""
    xy = np.array([[p["x"], p["y"]] for p in points])
    distance = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)  # a point is not its own neighbour
    nearest = distance.argmin(1)
    return float(np.mean([points[i][key] == points[j][key] for i, j in enumerate(nearest)]))


def same_label_chance(points: list[dict], key: str = "task") -> float:
    """`same_label_neighbours` of a map whose points were placed at random: the chance that
    another point drawn at random shares the point's `key` (sum over groups of n(n-1) / N(N-1))."""
    counts = Counter(p[key] for p in points)
    n = len(points)
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)) if n > 1 else 0.0
