"""Multi-task composition, measured (the paper's composition claims).

Given one LoRA-Diffusion adapter per task (and, optionally, one weight-LoRA adapter per
task), this trains the router (`router.trained_composition`) and scores, on every task's
held-out split:

* own:       the task's own adapter alone;
* router:    the router-weighted mixture, from the task's own instruction;
* uniform:   the plain average of all adapters;
* weight-LoRA equivalents: each task's LoRA adapter, and the adapters merged by peft's
  `add_weighted_adapter` (linear, cat = exact average of the updates, TIES);
* interference: adapter i applied alone to task j, for every i, j;
* router accuracy on paraphrased instructions it never saw (`data.PARAPHRASES`).
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from ..adapters import adapter_folder, base_for, check_adapter
from ..backbone import load_backbone
from ..data import PARAPHRASES, Task
from ..diffusion import DiffusionLM
from ..errors import UserError
from ..evaluate import evaluate_task
from ..metrics import primary_metric, score
from ..router import Composition, trained_composition


def _score(model, task: Task, config: dict, steps: int, seed: int) -> float:
    """The primary held-out score of `model` on `task`, in the adapter's sequence layout."""
    return score(evaluate_task(model, task, response_length=config["response_length"],
                               max_length=config["max_length"], steps=steps, seed=seed))


def composition_report(ld_adapters, lora_adapters=None, base=None, data_dir=None, max_eval: int = 200,
                       sampler_steps: int = 16, router_steps: int = 300, router_lr: float = 1e-3,
                       router_batch: int = 16, seed: int = 0, out_dir=None, progress: bool = True) -> dict:
    """Train the router over `ld_adapters`, then score every way of combining them (module docstring)."""
    composition, tasks, configs, router_summary = trained_composition(
        ld_adapters, base, data_dir, max_eval=max_eval, seed=seed, router_steps=router_steps, router_lr=router_lr,
        router_batch=router_batch, out_dir=Path(out_dir) / "router" if out_dir else None, progress=progress)
    if out_dir:  # the trained router, for the app and `Composition.load`
        composition.save(Path(out_dir) / "composition")
    report = {"analysis": "composition", "tasks": composition.labels, "max_eval": max_eval,
              "sampler_steps": sampler_steps,
              "router": {"steps": router_steps, "lr": router_lr, "batch_size": router_batch,
                         "final_train_loss": router_summary["final_train_loss"]},
              **score_composition(composition, tasks, configs, sampler_steps, seed),
              **router_choices(composition, tasks)}
    if lora_adapters:
        lora = weight_lora_merges(lora_adapters, base, tasks, sampler_steps, seed)
        for name, row in report["table"].items():
            row.update(lora.get(name, {}))
    return report


def score_composition(composition: Composition, tasks: dict[str, Task], configs: dict, sampler_steps: int,
                      seed: int) -> dict:
    """Per task: own adapter, uniform mix, router mix (and the router's weights); the interference matrix."""
    names, model = composition.labels, composition.model
    model.eval()
    m = len(names)
    interference = [[None] * m for _ in range(m)]  # adapter i alone on task j (the diagonal is "own")
    for i in range(m):
        composition.use([1.0 if k == i else 0.0 for k in range(m)])
        for j, name in enumerate(names):
            interference[i][j] = _score(model, tasks[name], configs[name], sampler_steps, seed)
    rows = {name: {"own": interference[j][j]} for j, name in enumerate(names)}
    composition.use([1.0 / m] * m)
    for name in names:
        rows[name]["uniform"] = _score(model, tasks[name], configs[name], sampler_steps, seed)
    composition.use(None)
    for name in names:
        rows[name]["router"] = _score(model, tasks[name], configs[name], sampler_steps, seed)
        rows[name]["router_weights_own_instruction"] = composition.instruction_weights(
            [tasks[name].train[0]["instruction"]])[0].tolist()
    return {"metric": {n: primary_metric(tasks[n].kind) for n in names},
            "interference": {"rows_adapter": names, "columns_task": names, "scores": interference},
            "table": rows}


def router_choices(composition: Composition, tasks: dict[str, Task]) -> dict:
    """The router's weights for every instruction: each task's own, its training paraphrases and
    the held-out ones it never saw; how often the own task's adapter gets the most weight, and
    the mean weight it gets (how sure the router is, right or wrong)."""
    names = composition.labels
    weights, correct = [], {"train": [0, 0], "heldout": [0, 0]}
    right_weight = {"train": [], "heldout": []}
    for j, name in enumerate(names):
        groups = {"canonical": [tasks[name].train[0]["instruction"]], **PARAPHRASES.get(name, {})}
        for group, texts in groups.items():
            for text, row in zip(texts, composition.instruction_weights(texts).tolist()):
                weights.append({"task": name, "group": group, "instruction": text, "weights": row})
                if group in correct:
                    correct[group][0] += int(max(range(len(names)), key=row.__getitem__) == j)
                    correct[group][1] += 1
                    right_weight[group].append(row[j])
    return {"router_weights": weights, "router_accuracy_counts": correct,
            "router_accuracy": {g: (c / n if n else None) for g, (c, n) in correct.items()},
            "router_right_weight": {g: (sum(w) / len(w) if w else None) for g, w in right_weight.items()}}


def weight_lora_merges(paths, base, tasks: dict, sampler_steps: int, seed: int) -> dict:
    """task -> {lora_own, lora_linear, lora_cat, lora_ties} with peft's add_weighted_adapter."""
    configs = [check_adapter(p)[0] for p in paths]
    backbone = load_backbone(base)
    for path, config in zip(paths, configs):
        if config["method"] != "lora":
            raise UserError(f"{path}: weight-LoRA merges need lora adapters trained on this base")
        base_for(config, backbone, where=f"adapter {path}")
        # peft falls back to unpickling adapter_model.bin when there is no safetensors file
        if not (adapter_folder(path) / "peft" / "adapter_model.safetensors").is_file():
            raise UserError(f"{path} has no peft/adapter_model.safetensors to merge")
    peft_model = None
    for j, path in enumerate(paths):
        folder = str(adapter_folder(path) / "peft")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(backbone.mlm, folder, adapter_name=f"task_{j}")
        else:
            peft_model.load_adapter(folder, adapter_name=f"task_{j}")
    adapters, m = [f"task_{j}" for j in range(len(paths))], len(paths)
    peft_model.add_weighted_adapter(adapters, [1.0 / m] * m, "linear", combination_type="linear")
    peft_model.add_weighted_adapter(adapters, [1.0 / m] * m, "cat", combination_type="cat")
    peft_model.add_weighted_adapter(adapters, [1.0] * m, "ties", combination_type="ties", density=0.5)
    model = DiffusionLM(backbone).eval()
    out = {}
    for j, config in enumerate(configs):
        name = config["task"]["name"]
        if name not in tasks:
            continue
        out[name] = {}
        for label, adapter in (("lora_own", f"task_{j}"), ("lora_linear", "linear"), ("lora_cat", "cat"),
                               ("lora_ties", "ties")):
            peft_model.set_adapter(adapter)
            out[name][label] = _score(model, tasks[name], config, sampler_steps, seed)
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
