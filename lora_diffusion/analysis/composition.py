"""Multi-task composition, measured (the paper's composition claims; review question 6).

Given one LoRA-Diffusion adapter per task (and, optionally, one weight-LoRA adapter per
task), this trains the router and scores, on every task's held-out split:

* own:       the task's own adapter alone;
* router:    the router-weighted mixture, from the task's own instruction;
* uniform:   the plain average of all adapters;
* weight-LoRA equivalents: each task's LoRA adapter, and the adapters merged by peft's
  `add_weighted_adapter` (linear, cat = exact average of the updates, TIES);
* interference: adapter i applied alone to task j, for every i, j;
* router accuracy on paraphrased instructions it never saw (`data.PARAPHRASES`).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..data import PARAPHRASES, collate, encode, load_task
from ..errors import UserError


def _metric(result: dict) -> float:
    return result["accuracy"] if "accuracy" in result else result["rouge_l"]


def _paraphrased(examples: list[dict], instructions: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{**ex, "instruction": rng.choice(instructions)} for ex in examples]


def train_router(composition, tasks: dict, configs: dict, steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
                 seed: int = 0, max_train: int = 2000, out_dir=None, progress: bool = True) -> dict:
    """Train the router on the tasks' training data with paraphrased instructions (train list)."""
    from ..router import RouterMethod
    from ..train import TrainConfig, train

    tok = composition.model.backbone.tokenizer
    encoded = []
    for j, name in enumerate(composition.labels):
        task, config = tasks[name], configs[name]
        instructions = [task.train[0]["instruction"]] + PARAPHRASES.get(name, {}).get("train", [])
        examples = _paraphrased(task.train[:max_train], instructions, seed + j)
        encoded.append(encode(tok, examples, config["response_length"], config["max_length"], truncate=True))
    order = [list(range(len(e.prompts))) for e in encoded]

    def batch_for_step(step: int, micro: int) -> dict:
        j = step % len(encoded)  # the tasks take turns
        rng = random.Random(seed * 7919 + step)
        return collate(encoded[j], rng.sample(order[j], min(batch_size, len(order[j]))),
                       composition.model.backbone.pad_id)

    method = RouterMethod(composition)
    method.attach(composition.model)
    summary = train(composition.model, method, batch_for_step, TrainConfig(steps=steps, batch_size=batch_size,
                    lr=lr, seed=seed, checkpoint_every=0, log_every=10), out_dir=out_dir, progress=progress)
    return summary


def trained_composition(ld_adapters, base=None, data_dir=None, max_train: int | None = None,
                        max_eval: int | None = None, seed: int = 0, router_steps: int = 300, router_lr: float = 1e-3,
                        router_batch: int = 16, out_dir=None, progress: bool = True):
    """A router over LoRA-Diffusion adapters (one per task), trained on their tasks' instructions.

    Returns (composition, tasks, adapter configs, the router's training summary); the
    tasks are loaded with `max_train` / `max_eval` for the caller to evaluate on.
    """
    from ..io import read_json
    from ..router import Composition, _adapter_folder

    composition = Composition.from_adapters(ld_adapters, base)
    names = composition.labels
    if len(set(names)) != len(names):
        raise UserError(f"one adapter per task, please; these are for {', '.join(names)}")
    configs = {name: read_json(_adapter_folder(p) / "adapter_config.json") for name, p in zip(names, ld_adapters)}
    tasks = {name: load_task(name, data_dir=data_dir, max_train=max_train, max_eval=max_eval, seed=seed)
             for name in names}
    summary = train_router(composition, tasks, configs, steps=router_steps, batch_size=router_batch, lr=router_lr,
                           seed=seed, out_dir=out_dir, progress=progress)
    return composition, tasks, configs, summary


def _evaluate(model, task, config, steps, seed):
    from ..evaluate import evaluate_task

    return evaluate_task(model, task, response_length=config["response_length"], max_length=config["max_length"],
                         steps=steps, seed=seed)


def composition_report(ld_adapters, lora_adapters=None, base=None, data_dir=None, max_eval: int = 200,
                       sampler_steps: int = 16, router_steps: int = 300, router_lr: float = 1e-3,
                       router_batch: int = 16, seed: int = 0, out_dir=None, progress: bool = True) -> dict:
    composition, tasks, configs, router_summary = trained_composition(
        ld_adapters, base, data_dir, max_eval=max_eval, seed=seed, router_steps=router_steps, router_lr=router_lr,
        router_batch=router_batch, out_dir=Path(out_dir) / "router" if out_dir else None, progress=progress)
    names = composition.labels
    if out_dir:  # the trained router, for the app and `Composition.load`
        composition.save(Path(out_dir) / "composition")
    model = composition.model
    model.eval()
    m = len(names)
    report = {"analysis": "composition", "tasks": names, "max_eval": max_eval, "sampler_steps": sampler_steps,
              "router": {"steps": router_steps, "lr": router_lr, "batch_size": router_batch,
                         "final_train_loss": router_summary["final_train_loss"]},
              "metric": {n: ("accuracy" if tasks[n].kind == "classification" else "rouge_l") for n in names}}

    # interference: adapter i alone on task j (the diagonal is "own")
    interference = [[None] * m for _ in range(m)]
    for i in range(m):
        composition.use([1.0 if k == i else 0.0 for k in range(m)])
        for j, name in enumerate(names):
            interference[i][j] = _metric(_evaluate(model, tasks[name], configs[name], sampler_steps, seed))
    report["interference"] = {"rows_adapter": names, "columns_task": names, "scores": interference}

    rows = {name: {"own": interference[j][j]} for j, name in enumerate(names)}
    composition.use([1.0 / m] * m)
    for name in names:
        rows[name]["uniform"] = _metric(_evaluate(model, tasks[name], configs[name], sampler_steps, seed))
    composition.use(None)
    for j, name in enumerate(names):
        rows[name]["router"] = _metric(_evaluate(model, tasks[name], configs[name], sampler_steps, seed))
        rows[name]["router_weights_own_instruction"] = composition.instruction_weights(
            [tasks[name].train[0]["instruction"]])[0].tolist()

    # the router on instructions: the train paraphrases, and the held-out ones it never saw
    weights = []
    correct = {"train": [0, 0], "heldout": [0, 0]}
    for j, name in enumerate(names):
        groups = {"canonical": [tasks[name].train[0]["instruction"]], **PARAPHRASES.get(name, {})}
        for group, texts in groups.items():
            w = composition.instruction_weights(texts)
            for text, row in zip(texts, w.tolist()):
                weights.append({"task": name, "group": group, "instruction": text, "weights": row})
                if group in correct:
                    correct[group][0] += int(max(range(m), key=row.__getitem__) == j)
                    correct[group][1] += 1
    report["router_weights"] = weights
    report["router_accuracy"] = {g: (c / n if n else None) for g, (c, n) in correct.items()}
    report["router_accuracy_counts"] = correct

    if lora_adapters:
        lora = weight_lora_merges(lora_adapters, base, tasks, sampler_steps, seed)
        for name in names:
            rows[name].update(lora.get(name, {}))
    report["table"] = rows
    return report


def weight_lora_merges(paths, base, tasks: dict, sampler_steps: int, seed: int) -> dict:
    """task -> {lora_own, lora_linear, lora_cat, lora_ties} with peft's add_weighted_adapter."""
    from peft import PeftModel

    from ..backbone import load_backbone
    from ..diffusion import DiffusionLM
    from ..io import read_json
    from ..router import _adapter_folder

    configs = [read_json(_adapter_folder(p) / "adapter_config.json") for p in paths]
    names = [c["task"]["name"] for c in configs]
    backbone = load_backbone(base)
    for path, config in zip(paths, configs):
        if config["method"] != "lora" or config["base"]["fingerprint"] != backbone.fingerprint():
            raise UserError(f"{path}: weight-LoRA merges need lora adapters trained on this base")
    peft_model = None
    for j, path in enumerate(paths):
        folder = _adapter_folder(path) / "peft"
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(backbone.mlm, str(folder), adapter_name=f"task_{j}")
        else:
            peft_model.load_adapter(str(folder), adapter_name=f"task_{j}")
    adapters, m = [f"task_{j}" for j in range(len(paths))], len(paths)
    peft_model.add_weighted_adapter(adapters, [1.0 / m] * m, "linear", combination_type="linear")
    peft_model.add_weighted_adapter(adapters, [1.0 / m] * m, "cat", combination_type="cat")
    peft_model.add_weighted_adapter(adapters, [1.0] * m, "ties", combination_type="ties", density=0.5)
    model = DiffusionLM(backbone).eval()
    out = {}
    for j, name in enumerate(names):
        if name not in tasks:
            continue
        scores = {}
        for label, adapter in (("lora_own", f"task_{j}"), ("lora_linear", "linear"), ("lora_cat", "cat"),
                               ("lora_ties", "ties")):
            peft_model.set_adapter(adapter)
            scores[label] = _metric(_evaluate(model, tasks[name], configs[j], sampler_steps, seed))
        out[name] = scores
    return out


def composition_markdown(report: dict) -> str:
    columns = [("own", "LoRA-D own"), ("router", "LoRA-D router"), ("uniform", "LoRA-D uniform"),
               ("lora_own", "LoRA own"), ("lora_linear", "LoRA merge (linear)"), ("lora_cat", "LoRA merge (cat)"),
               ("lora_ties", "LoRA merge (TIES)")]
    present = [(k, title) for k, title in columns if any(k in r for r in report["table"].values())]
    lines = ["| task (metric) | " + " | ".join(t for _, t in present) + " |", "|---|" + "---|" * len(present)]
    for name, row in report["table"].items():
        cells = [f"{100 * row[k]:.1f}" if k in row else "" for k, _ in present]
        lines.append(f"| {name} ({report['metric'][name]}) | " + " | ".join(cells) + " |")
    acc, counts = report["router_accuracy"], report["router_accuracy_counts"]
    lines += ["", f"Router picks the right adapter for {counts['heldout'][0]}/{counts['heldout'][1]} held-out "
                  f"paraphrased instructions ({100 * acc['heldout']:.0f}%) and {counts['train'][0]}/"
                  f"{counts['train'][1]} training paraphrases." if acc["heldout"] is not None else ""]
    return "\n".join(lines)


def router_weights_figure(report: dict):
    """Heatmap: router weight of each adapter for every instruction (held-out ones marked)."""
    import plotly.graph_objects as go

    rows = report["router_weights"]
    labels = [f"{'[held-out] ' if r['group'] == 'heldout' else ''}{r['instruction'][:60]}" for r in rows]
    fig = go.Figure(go.Heatmap(z=[r["weights"] for r in rows], x=report["tasks"], y=labels, zmin=0, zmax=1,
                               colorscale="Blues", colorbar_title="weight"))
    fig.update_layout(title="Router weights per instruction", xaxis_title="task adapter",
                      yaxis_autorange="reversed", template="plotly_white", height=max(400, 22 * len(rows)))
    return fig


def interference_figure(report: dict):
    import plotly.graph_objects as go

    inter = report["interference"]
    fig = go.Figure(go.Heatmap(z=inter["scores"], x=inter["columns_task"], y=inter["rows_adapter"],
                               colorscale="Viridis", text=[[f"{100 * v:.1f}" for v in row] for row in inter["scores"]],
                               texttemplate="%{text}"))
    fig.update_layout(title="Interference: adapter (row) applied alone to task (column)", template="plotly_white",
                      xaxis_title="task", yaxis_title="adapter")
    return fig


__all__ = ["composition_report", "composition_markdown", "router_weights_figure", "interference_figure",
           "train_router", "weight_lora_merges"]
