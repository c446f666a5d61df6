"""A fine-tuning run: a task, a base, a method and a budget in; an adapter and held-out metrics out.

`fine_tune` is what `lora-diffusion train`, `compare`, the app's jobs and the notebooks
call: it encodes the task, attaches the method, trains (`training.train`), scores the
held-out split and writes the run folder (`adapter/`, `results.json`, `metrics.jsonl`,
`checkpoints/`). `aggregate_seeds` and `markdown_table` summarise runs over seeds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .adapters import RUN_ADAPTER, save_adapter, with_adapter
from .backbone import Backbone, load_backbone
from .data import Task, batch_schedule, collate, encode, load_task, response_length_for
from .diffusion import DiffusionLM
from .distributed import full, is_main, micro_batches_per_step, share, sharding, world_size
from .errors import UserError
from .evaluate import evaluate_task
from .files import write_json
from .methods import Method, make_method
from .metrics import mean_std, metric_of, over_seeds, percent, primary_metric, reported_metrics
from .training import TrainConfig, train


def fine_tune(backbone: Backbone, task: Task, method: Method, config: TrainConfig, out_dir=None,
              max_length: int | None = None, truncate: bool = False, sampler_steps: int = 64,
              eval_batch_size: int = 64, monitor_examples: int = 200, on_log=None, should_stop=None,
              progress: bool = True, score_if_stopped: bool = True) -> dict:
    """Train `method` on `task.train`, evaluate on `task.eval`, save adapter + results in `out_dir`.

    During training a fixed slice of the held-out split (`monitor_examples`) is scored every
    `config.eval_every` steps to show progress; the reported metrics use the whole split.
    A run that `should_stop` ends is scored all the same, unless `score_if_stopped` is False:
    then it is not evaluated at all, and its results hold `stopped_at_step` instead of metrics.
    Returns the results (as written to results.json) with the trained model under "model".
    """
    max_length = max_length or backbone.max_length
    if sharding() and not (backbone.source.startswith("hf:") or Path(backbone.source).is_dir()):
        raise UserError(f"under FSDP the base must be a model folder or hf:NAME, not {backbone.source}: the "
                        "trained model is scored on a copy loaded from it again")
    if max_length > backbone.max_length:
        raise UserError(f"--max-length {max_length} is longer than the model's {backbone.max_length} positions")
    fingerprint = backbone.fingerprint()  # of the base, before any training
    response_length = response_length_for(backbone.tokenizer, task.train)
    enc = encode(backbone.tokenizer, task.train, response_length, max_length, truncate, where=f"{task.name} train")
    model = DiffusionLM(backbone)
    torch.manual_seed(config.seed)  # the method's own init draws from here
    method.attach(model)
    indices_for_step = batch_schedule(len(enc.prompts), config.batch_size, config.seed)

    def batch_for_step(step: int, micro: int) -> dict:
        # micro counts the step's micro-batches over every process of the run (see `distributed`)
        return collate(enc, indices_for_step(step * micro_batches_per_step(config.grad_accum) + micro),
                       backbone.pad_id)

    eval_kwargs = dict(response_length=response_length, max_length=max_length, steps=sampler_steps,
                       batch_size=eval_batch_size, seed=config.seed, truncate=truncate)

    def monitor(m) -> dict:
        r = evaluate_task(m, task, max_examples=monitor_examples, **eval_kwargs)
        return {f"monitor_{k}": round(r[k], 4) for k in reported_metrics(task.kind)}

    # summary["train_seconds"]: the whole run's, summed over the processes a resumed run took
    identity = {"method": method.name, "options": method.options(), "task": task.name,
                "train_examples": _digest(task.train), "base": fingerprint, "max_length": max_length,
                "truncate": truncate, "processes": world_size()}  # another count deals other batches
    summary = train(model, method, batch_for_step, config, out_dir=out_dir, evaluate=monitor,
                    on_log=on_log, should_stop=should_stop, progress=progress, identity=identity,
                    evaluate_if_stopped=score_if_stopped)
    if summary["engine"] == "fsdp":  # the trained model is sharded over the processes
        model, method = _whole_copy(backbone, model, method)
    unscored = summary["stopped_early"] and not score_if_stopped
    result = None
    if is_main():  # on several processes the main one evaluates and writes; the others get its results
        scores = ({"task": task.name, "kind": task.kind, "stopped_at_step": summary["steps"]} if unscored
                  else _evaluate_as_served(model, method, task, eval_kwargs))
        result = {**scores, "method": method.name,
                  "options": method.options(), "seed": config.seed, "n_train": len(task.train),
                  **method.accounting(), "train": summary, "config": asdict(config), "base": backbone.label,
                  "source": task.source}
        if enc.n_truncated:
            result["n_train_truncated"] = enc.n_truncated
        if out_dir is not None:
            save_adapter(Path(out_dir) / RUN_ADAPTER, method, backbone, fingerprint, task,
                         response_length=response_length, max_length=max_length, train_summary=summary)
            write_json(Path(out_dir) / "results.json", result)
    result = share(result, device=next(model.parameters()).device)
    result["model"] = model
    return result


def _whole_copy(backbone: Backbone, model: DiffusionLM, method: Method) -> tuple[DiffusionLM, Method]:
    """After FSDP training: the method's tensors gathered on every process (a collective), and
    on the main process the model it scores and saves, built as `eval --adapter` loads one:
    the base from its files, the method attached, the gathered tensors loaded. (Elsewhere
    the sharded ones are returned: the other processes only wait for the main one's results.)"""
    state = full(method.state_dict())
    if not is_main():
        return model, method
    sharded = next(backbone.mlm.parameters())
    model, copy = with_adapter(load_backbone(backbone.source, dtype=sharded.dtype), method.name, method.options(),
                               state)
    return model.to(sharded.device), copy


def _digest(examples: list[dict]) -> str:
    """A short hash of the training examples: a resume must train on the same data."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:16]


def _evaluate_as_served(model, method: Method, task: Task, eval_kwargs: dict) -> dict:
    """Held-out metrics with the method as it is served: merged into the base where it can be,
    as `eval --adapter` loads it."""
    if method.can_merge:
        method.merge()
    metrics = evaluate_task(model, task, **eval_kwargs)
    if method.can_merge:
        method.unmerge()
    return metrics


def train_adapter(task_name: str, method: str, out_dir=None, steps: int = 150, options: dict | None = None,
                  data_dir=None, max_eval: int = 200, sampler_steps: int = 8, base=None, **config) -> dict:
    """The short form the notebooks use: load the task and the base, fine-tune, print the score.

    Extra keyword arguments go to the TrainConfig. Returns `fine_tune`'s results.
    """
    task = load_task(task_name, data_dir=data_dir, max_eval=max_eval)
    result = fine_tune(load_backbone(base), task, make_method(method, options), TrainConfig(steps=steps, **config),
                       out_dir=out_dir, sampler_steps=sampler_steps, progress=False)
    print(f"{method} on {task_name}: held-out {primary_metric(task.kind)} {result[primary_metric(task.kind)]:.3f} "
          f"on {result['n_eval']} examples")
    return result


def aggregate_seeds(results: list[dict]) -> dict:
    """One summary of the same run repeated over seeds: metrics as mean ± std (sample std)."""
    first = results[0]
    summary = {key: first.get(key) for key in ("task", "method", "n_eval", "n_train", "steps", "base", "source")}
    summary["seeds"] = [r["seed"] for r in results]
    summary.update(over_seeds(results))
    summary["train_steps"] = first["train"]["steps"]
    summary["batch_size"] = first["config"]["batch_size"]
    summary["trainable_parameters"] = first.get("trainable_parameters")
    # Both the whole run's, across resumes: measured (evaluations and checkpoints included) and logged steps.
    summary["train_seconds"] = mean_std([r["train"]["train_seconds"] for r in results])
    if all("logged_train_seconds" in r["train"] for r in results):
        summary["logged_train_seconds"] = mean_std([r["train"]["logged_train_seconds"] for r in results])
    if all(r["train"].get("final_train_loss") is not None for r in results):
        summary["final_train_loss"] = mean_std([r["train"]["final_train_loss"] for r in results])
    summary["runs"] = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    return summary


def headline(result: dict) -> str:
    """One readable line of a run's held-out metrics."""
    where = f"{result['task']} held-out ({result['n_eval']} examples)"
    if metric_of(result) == "accuracy":
        return (f"seed {result.get('seed', 0)}: {where}: generative accuracy {result['accuracy']:.3f}, verbalizer "
                f"accuracy {result['verbalizer_accuracy']:.3f} (majority class {result['chance']:.3f})")
    return f"seed {result.get('seed', 0)}: {where}: ROUGE-L {result['rouge_l']:.3f}, token F1 {result['token_f1']:.3f}"


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
                    f"| {steps} × {batch} | {r.get('n_eval')} | {percent(r.get('accuracy'))} "
                    f"| {percent(r.get('verbalizer_accuracy'))} | {percent(r.get('rouge_l'))} |")
    return "\n".join(rows)
