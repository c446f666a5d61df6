"""`lora-diffusion`: fine-tune, compare and inspect PEFT methods on a masked diffusion LM.

Bad input ends with one line `error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .bounds import CACHE_MB, MAX_EPOCHS, MAX_LR, MAX_SEED, MAX_TEMPERATURE
from .errors import UserError
from .distributed import close_process_group, is_main, micro_batches_per_step, world_size
from .paths import TRUST_REMOTE_CODE

# Each command imports what it needs when it runs (torch, transformers, peft, gradio take
# seconds to import): `lora-diffusion --help` stays quick, and only `app` pulls in gradio.


# ---------------------------------------------------------------------------------------
# Pieces several commands share
# ---------------------------------------------------------------------------------------

def _load_task(args, seed: int):
    from .data import load_task

    return load_task(args.task, data_dir=args.data_dir, train_file=args.train_file, eval_file=args.eval_file,
                     fmt=args.format, text_column=args.text_column, label_column=args.label_column,
                     response_column=args.response_column, columns=args.columns,
                     instruction=args.instruction, verbalizers=args.verbalizers,
                     max_train=getattr(args, "max_train_examples", None),
                     max_eval=args.max_eval_examples, seed=seed)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _log(message: str) -> None:
    if is_main():  # under accelerate launch / torchrun one process speaks for the run
        print(message, file=sys.stderr, flush=True)


def _distinct_seeds(seeds: list[int]) -> None:
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seed lists a seed twice: {seeds}")


def _train_config(args, seed: int = 0):
    """The TrainConfig of `compare` and `analyze data-efficiency` (a fixed budget, no lr)."""
    from .training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=seed,
                       bf16=args.bf16, tf32=args.tf32, compile=args.compile,
                       eval_every=args.eval_every or 0, checkpoint_every=args.checkpoint_every,
                       device=args.device)


def _learning_rates(args) -> dict | None:
    from .compare import learning_rates_from

    return learning_rates_from(*args.lr_from) if args.lr_from else None


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def cmd_prepare_base(args) -> None:
    from .paths import SHIPPED_BASE
    from .prepare_base import prepare_base

    _threads(args.threads)
    card = prepare_base(data_dir=args.data_dir, out=args.out or SHIPPED_BASE, work_dir=args.work_dir,
                        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        seed=args.seed, bf16=args.bf16)
    print(json.dumps({"out": str(args.out or SHIPPED_BASE), "heldout": card["heldout"]}))


def cmd_train(args) -> None:
    from .files import write_json
    from .methods import method_config, parse_option_pairs
    from .runs import aggregate_seeds, headline

    _threads(args.threads)
    if args.steps is not None and args.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    method_config(args.method, parse_option_pairs(args.option))  # a bad option fails before any work
    _distinct_seeds(args.seed)
    several = len(args.seed) > 1
    results = [_train_seed(args, seed, Path(args.out) / f"seed-{seed}" if (args.out and several) else args.out)
               for seed in args.seed]
    for r in results:
        _log(headline(r))
    final = aggregate_seeds(results) if several else results[0]
    if not is_main():
        return
    summary_path = args.results or (os.path.join(args.out, "summary.json") if (args.out and several) else None)
    if summary_path:
        write_json(summary_path, final)
        _log(f"summary: {summary_path}")
    print(json.dumps(final))


def _train_seed(args, seed: int, out) -> dict:
    """One seed of `train`: a fresh base (full fine-tuning changes it), the method, the run."""
    from .adapters import adapter_folder
    from .backbone import load_backbone
    from .methods import make_method, parse_option_pairs
    from .runs import fine_tune
    from .training import TrainConfig

    task = _load_task(args, seed)
    if args.epochs is not None:
        steps = max(1, math.ceil(args.epochs * len(task.train)
                                 / (args.batch_size * micro_batches_per_step(args.grad_accum))))
    else:
        steps = args.steps if args.steps is not None else 300
    config = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, seed=seed,
                         bf16=args.bf16, tf32=args.tf32, compile=args.compile, cache_base=args.cache_base,
                         cache_base_mb=args.cache_base_mb,
                         eval_every=args.eval_every if args.eval_every is not None else max(steps // 4, 1),
                         checkpoint_every=args.checkpoint_every, device=args.device)
    backbone = load_backbone(args.base)
    method = make_method(args.method, parse_option_pairs(args.option))
    _log(f"task {task.name}: {len(task.train)} train / {len(task.eval)} held-out examples; method {method.name}; "
         f"seed {seed}; {steps} steps of {args.batch_size * micro_batches_per_step(args.grad_accum)}"
         + (f" over {world_size()} processes" if world_size() > 1 else ""))
    result = fine_tune(backbone, task, method, config, out_dir=out, max_length=args.max_length,
                       truncate=args.truncate, sampler_steps=args.sampler_steps)
    result.pop("model")
    if out:
        _log(f"adapter: {adapter_folder(out)}  results: {os.path.join(out, 'results.json')}")
    return result


def cmd_eval(args) -> None:
    from .adapters import adapter_label, load_model
    from .data import check_task_fits_adapter
    from .evaluate import evaluate_task
    from .files import write_json

    _threads(args.threads)
    if args.adapter is None and args.task is None:
        raise UserError("give --task (or --adapter, whose task is used)")
    if args.adapter and len(args.adapter) > 1:
        return _eval_mixed(args)
    args.adapter = args.adapter[0] if args.adapter else None
    model, method, config = load_model(args.adapter, base=args.base)
    if args.task is None:
        args.task = _adapter_task_name(config)
    task = _eval_task(args, config)
    if config is not None:
        check_task_fits_adapter(task, config["task"], adapter_label(args.adapter))
    result = evaluate_task(model, task, response_length=config and config["response_length"],
                           max_length=args.max_length or (config and config["max_length"]), steps=args.steps,
                           remasking=args.remasking, batch_size=args.batch_size, seed=args.seed,
                           truncate=args.truncate, threshold=args.threshold)
    result["method"] = method.name if method else "base"
    result["adapter"] = args.adapter
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result))


def _eval_mixed(args) -> None:
    """Several adapters scored on one task in mixed batches (each row its own adapter)."""
    from .adapters import adapter_label, read_adapter_config
    from .data import check_task_fits_adapter
    from .evaluate import evaluate_mixed
    from .files import write_json
    from .mixed import MixedAdapters

    configs = [read_adapter_config(path) for path in args.adapter]
    # One batch decodes one response length and encodes prompts at one length: an adapter scored
    # at another than its own would not score as it does alone.
    for key, what in (("response_length", "response lengths"), ("max_length", "prompt lengths (max_length)")):
        values = sorted({c[key] for c in configs})
        if len(values) > 1 and not (key == "max_length" and args.max_length):
            raise UserError(f"the adapters were trained with different {what} ({', '.join(map(str, values))} "
                            "tokens): a mixed batch would score some at a length they were not trained for; "
                            "evaluate them one at a time")
    mixed = MixedAdapters(args.adapter, base=args.base)
    if args.task is None:
        names = {_adapter_task_name(c) for c in configs}
        if len(names) > 1:
            raise UserError(f"the adapters were trained on different tasks ({', '.join(sorted(names))}): give --task")
        args.task = names.pop()
    task = _eval_task(args, configs[0])
    for path, config in zip(args.adapter, configs):
        check_task_fits_adapter(task, config["task"], adapter_label(path))
    results = evaluate_mixed(mixed.model, mixed.assign, len(configs), task,
                             response_length=configs[0]["response_length"],
                             max_length=args.max_length or configs[0]["max_length"],
                             steps=args.steps, remasking=args.remasking, batch_size=args.batch_size, seed=args.seed,
                             truncate=args.truncate, threshold=args.threshold)
    for result, path, config in zip(results, args.adapter, configs):
        result.update(method=config["method"], adapter=path)
    report = {"mixed_batch": True, "results": results}
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report))


def _adapter_task_name(config: dict) -> str:
    """The task an adapter was trained on, where it can be loaded by name again."""
    from .data import TASK_NAMES

    name = config["task"]["name"]
    if name not in TASK_NAMES and not name.startswith("hub:"):
        raise UserError(f"the adapter was trained on files ({name}); give --task csv/tsv/jsonl with --eval-file")
    return name


def _eval_task(args, adapter_config: dict | None):
    """The task to score: as for training, or, for an adapter and only an --eval-file, from that file
    read with the labels and instruction the adapter was trained with (no train file needed)."""
    from .data import FILE_TASKS, load_eval_task

    if adapter_config is None or args.task not in FILE_TASKS or args.train_file or not args.eval_file:
        return _load_task(args, args.seed)
    return load_eval_task(args.format or args.task, args.eval_file, adapter_config["task"],
                          text_column=args.text_column, label_column=args.label_column,
                          response_column=args.response_column,
                          columns=args.columns, verbalizers=args.verbalizers, max_eval=args.max_eval_examples)


def cmd_sample(args) -> None:
    from .adapters import load_model, task_instruction
    from .mixed import MixedAdapters, decode

    _threads(args.threads)
    sampling = dict(remasking=args.remasking, temperature=args.temperature, block_length=args.block_length,
                    threshold=args.threshold)
    if args.adapter and len(args.adapter) > 1:  # one mixed batch: each row its own adapter
        mixed = MixedAdapters(args.adapter, base=args.base)
        answers = mixed.answers([args.prompt] * args.n, steps=args.steps, length=args.length,
                                instruction=args.instruction, seed=args.seed, **sampling)
        for per_adapter in answers:
            for label, text in zip(mixed.labels, per_adapter):
                print(f"{label}: {text}")
        return
    model, _, config = load_model(args.adapter[0] if args.adapter else None, base=args.base)
    instruction = args.instruction if args.instruction is not None else (config and task_instruction(config))
    length = args.length or (config["response_length"] if config else 32)
    # the n samples in one batch, as the mixed path decodes them
    for text in decode(model, [(instruction or "", args.prompt)] * args.n, length, args.steps,
                       batch_size=args.n, seed=args.seed, **sampling):
        print(text)


def cmd_compare(args) -> None:
    from .compare import markdown, run_compare, specs_from
    from .methods import parse_option_pairs

    _threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    specs = specs_from(args.preset, methods, parse_option_pairs(args.option), args.rows)
    _distinct_seeds(args.seed)
    config = _train_config(args)
    task = _load_task(args, 0)  # one training subset for every row and seed: an equal budget
    results = run_compare(task, specs, args.seed, config, args.out, base=args.base, lr_sweep=args.lr_sweep,
                          validation_fraction=args.validation_fraction,
                          sampler_steps=args.sampler_steps, profile=not (args.no_profile or args.sweep_only),
                          progress=not args.quiet, log=_log, sweep_only=args.sweep_only,
                          learning_rates=_learning_rates(args), results_file=args.results, jobs=args.jobs)
    if is_main():  # under accelerate launch / torchrun one process speaks for the run
        print(markdown(results))
    _log(f"results: {os.path.join(args.out, 'results.json')}")


def cmd_bench(args) -> None:
    from .compare import specs_from
    from .files import write_json, write_text
    from .methods import method_class, parse_option_pairs
    from .profiling import bench_table, profile_generation, profile_training

    if args.preset and args.methods:
        raise UserError("give --preset or --methods, not both")
    methods = [m.strip() for m in (args.methods or "lora_diffusion,lora,full").split(",")]
    if args.option and (args.preset or len(methods) > 1):
        raise UserError("--option needs a single method in --methods (a preset's rows carry their own)")
    specs = specs_from(args.preset, None if args.preset else methods, parse_option_pairs(args.option), args.rows)
    common = dict(base=args.base or "shipped", device=args.device, threads=args.threads, bf16=args.bf16)
    # generation: one batch of the same shape, one sampler step per response token
    decoding = dict(batch_sizes=(args.batch_size,), lengths=(args.response_length,), steps=args.response_length,
                    prompt_length=args.prompt_length, **common)
    base_latency = profile_generation("base", **decoding)["rows"][0]["latency_s"] if args.generation else None
    rows = []
    for spec in specs:
        r = profile_training(spec.method, spec.options, batch_size=args.batch_size, prompt_length=args.prompt_length,
                             response_length=args.response_length, steps=args.steps, warmup=args.warmup,
                             tf32=args.tf32, compile=args.compile, **common)
        r["label"] = spec.label
        if args.generation:  # as `load_model` serves the adapter: merged where the method merges
            merged = method_class(spec.method).can_merge
            timed = profile_generation(spec.method, spec.options, merged=merged, **decoding)["rows"][0]
            r["generation"] = {"latency_s": timed["latency_s"], "tokens_per_s": timed["tokens_per_s"],
                               "merged": merged, "base_latency_s": base_latency,
                               "overhead": timed["latency_s"] / base_latency - 1}
        rows.append(r)
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        gen = f", generation {100 * r['generation']['overhead']:+.0f}% against the base" if args.generation else ""
        _log(f"{spec.label}: {r['sec_per_step']:.4f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
             f"{r['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s{mfu}, peak {r['peak_memory_bytes'] / 2**20:.0f} MB, "
             f"{r['trainable_parameters']:,} trainable{gen}")
    reference = rows[0]
    ratios = {r["label"]: {"step_time_ratio": reference["sec_per_step"] / r["sec_per_step"],
                           "peak_memory_ratio": reference["peak_memory_bytes"] / r["peak_memory_bytes"]}
              for r in rows[1:]}
    report = {"reference": reference["label"], "ratios_of_reference_to": ratios, "rows": rows}
    if args.out:
        write_json(args.out, report)
        write_text(Path(args.out).with_suffix(".md"), bench_table(report))
    shown = ("label", "method", "sec_per_step", "tokens_per_s", "mfu", "peak_memory_bytes", "trainable_parameters",
             "device", "generation")
    print(json.dumps({**report, "rows": [{k: r[k] for k in shown if k in r} for r in rows]}))


def cmd_report(args) -> None:
    from .files import read_json
    from .runs import markdown_table

    results = [read_json(path) for path in args.results]
    for path, r in zip(args.results, results):
        if not isinstance(r, dict) or not all(k in r for k in ("task", "method", "n_eval")):
            raise UserError(f"{path} is not a results file of `train --results` or `eval --out`")
    print(markdown_table(results))


def cmd_lessons(args) -> None:
    from .lessons import build

    _threads(args.threads)
    print(json.dumps(build(base=args.base)))


def cmd_app(args) -> None:
    from .app.main import serve

    serve(args.workspace, data_dir=args.data_dir, base=args.base, host=args.host, port=args.port,
          job_minutes=args.job_minutes)


# ---------------------------------------------------------------------------------------
# `analyze NAME`: each analysis writes OUT/<name>.json and one HTML page per figure
# ---------------------------------------------------------------------------------------

def analyze_effective_rank(args):
    from .analysis.rank import effective_rank_report
    from .plots import effective_rank_figure, effective_rank_per_layer_figure

    report = effective_rank_report(args.adapters, base=args.base, task_name=args.task, data_dir=args.data_dir,
                                   n_examples=args.examples, steps=args.sampler_steps, seed=args.seed,
                                   per_layer=args.per_layer)
    summary = {r["label"]: [round(x, 2) for x in r["effective_rank"]] for r in report["methods"]}
    figures = {"effective_rank": effective_rank_figure(report)}
    if args.per_layer:
        figures["effective_rank_per_layer"] = effective_rank_per_layer_figure(report)
    return report, figures, summary


def analyze_tsne(args):
    from .analysis.tsne import trajectory_map
    from .plots import tsne_figure

    report = trajectory_map(args.adapters, base=args.base, task_name=args.task, data_dir=args.data_dir,
                            n_examples=args.examples, steps=args.sampler_steps, method=args.projection,
                            seed=args.seed)
    figures = {f"tsne_{which}_by_{colour}": tsne_figure(report, which, colour)
               for which in ("perturbations", "base") for colour in ("task", "step")}
    return report, figures, {w: round(report[w]["trustworthiness"], 3) for w in ("perturbations", "base")}


def analyze_forgetting(args):
    from .analysis.forgetting import forgetting_report
    from .plots import forgetting_figure

    report = forgetting_report(args.adapters, base=args.base, data_dir=args.data_dir, rows=args.examples,
                               seed=args.seed)
    summary = {m["label"]: {s: round(v["nelbo"], 3) for s, v in m["scores"].items()} for m in report["models"]}
    return report, {"forgetting": forgetting_figure(report)}, summary


def analyze_composition(args):
    from .analysis.composition import composition_markdown, composition_report
    from .files import write_text
    from .plots import interference_figure, router_weights_figure

    report = composition_report(args.adapters, lora_adapters=args.lora_adapters, base=args.base,
                                data_dir=args.data_dir, max_eval=args.examples, sampler_steps=args.sampler_steps,
                                router_steps=args.router_steps, seed=args.seed, out_dir=args.out,
                                progress=not args.quiet)
    table = composition_markdown(report)
    write_text(Path(args.out) / "composition.md", table + "\n")
    return report, {"router_weights": router_weights_figure(report), "interference": interference_figure(report)}, table


def analyze_scaling(args):
    from .analysis.scaling import rank_scaling_report
    from .plots import scaling_figures

    report = rank_scaling_report(ranks=args.ranks, base=args.base or "shipped",
                                 batch_size=args.batch_size, gen_ranks=args.gen_ranks,
                                 gen_batch_sizes=args.gen_batch_sizes,
                                 gen_lengths=args.gen_lengths, gen_steps=args.sampler_steps,
                                 bf16=args.bf16, device=args.device, threads=args.threads,
                                 isolated=not args.in_process, log=_log)
    summary = {f"{r['method']}{'' if r['rank'] is None else ' r=' + str(r['rank'])}":
               {"s/step": round(r["sec_per_step"], 4), "peak MB": round(r["peak_memory_bytes"] / 2**20)}
               for r in report["train"]}
    return report, scaling_figures(report), summary


def analyze_mixed_batch(args):
    from .analysis.mixed_batch import mixed_batch_report

    report = mixed_batch_report(adapter_counts=args.adapter_counts, base=args.base, batch_size=args.batch_size,
                                response_length=args.response_length, steps=args.sampler_steps, log=_log)
    summary = {f"{m['method']}, {r['adapters']} adapters": f"{r['throughput_ratio']:.2f}x one adapter's tokens/s"
               for m in report["methods"] for r in m["mixed"]}
    return report, {}, summary


def analyze_data_efficiency(args):
    from .analysis.data_efficiency import data_efficiency_report
    from .metrics import score
    from .plots import data_efficiency_figure

    if not args.task:
        raise UserError("data-efficiency needs --task")
    _distinct_seeds(args.seeds)
    report = data_efficiency_report(_load_task(args, 0), args.sizes,
                                    methods=[m.strip() for m in args.methods.split(",")], seeds=args.seeds,
                                    config=_train_config(args), out_dir=Path(args.out) / "runs", base=args.base,
                                    sampler_steps=args.sampler_steps, progress=not args.quiet, log=_log,
                                    learning_rates=_learning_rates(args), jobs=args.jobs)
    summary = [(p["n_train"], p["method"], round(score(p), 4)) for p in report["points"]]
    return report, {"data_efficiency": data_efficiency_figure(report)}, summary


ANALYSES = {"effective-rank": analyze_effective_rank, "tsne": analyze_tsne, "forgetting": analyze_forgetting,
            "composition": analyze_composition, "scaling": analyze_scaling,
            "data-efficiency": analyze_data_efficiency, "mixed-batch": analyze_mixed_batch}


def cmd_analyze(args) -> None:
    from .files import write_json
    from .plots import write_figure

    _threads(args.threads)
    report, figures, summary = ANALYSES[args.analysis](args)
    out, name = Path(args.out), args.analysis.replace("-", "_")
    write_json(out / f"{name}.json", report)
    for fig_name, figure in figures.items():
        write_figure(out / f"{fig_name}.html", figure, png=args.png)
    _log(f"wrote {out / (name + '.json')}" + (f" and {', '.join(f + '.html' for f in figures)}" if figures else ""))
    print(summary if isinstance(summary, str) else json.dumps(summary))


# ---------------------------------------------------------------------------------------
# Flag types: every number and output path is checked when the command line is parsed,
# before any work starts (argparse turns ArgumentTypeError into "argument --x: ..." + exit 2)
# ---------------------------------------------------------------------------------------

def _number(text: str, kind: type, least: float, strictly: bool = False, most: float | None = None):
    """`text` as an int or a finite float >= least (> least if `strictly`, <= most if given)."""
    words = "a whole number" if kind is int else "a finite number"
    bound = f"{'>' if strictly else '>='} {least:g}" + (f" and <= {most:g}" if most is not None else "")
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants {words} {bound}, not {text!r}") from None
    if not math.isfinite(value) or value < least or (strictly and value == least) or (
            most is not None and value > most):
        raise argparse.ArgumentTypeError(f"wants {words} {bound}, not {text!r}")
    return value


def port(text: str) -> int:
    return _number(text, int, 1, most=65535)


def count(text: str) -> int:
    """1, 2, 3, ...: steps, batch sizes, examples, lengths."""
    return _number(text, int, 1)


def count_or_zero(text: str) -> int:
    """0 (off), 1, 2, ...: intervals such as --eval-every."""
    return _number(text, int, 0)


def seed(text: str) -> int:
    return _number(text, int, 0, most=MAX_SEED)


def learning_rate(text: str) -> float:
    """> 0, and small enough that AdamW's float32 arithmetic stays finite."""
    return _number(text, float, 0, strictly=True, most=MAX_LR)


def epochs(text: str) -> float:
    return _number(text, float, 0, strictly=True, most=MAX_EPOCHS)


def temperature(text: str) -> float:
    """0 (greedy) or more, up to MAX_TEMPERATURE."""
    return _number(text, float, 0, most=MAX_TEMPERATURE)


def non_negative(text: str) -> float:
    return _number(text, float, 0)


def fraction(text: str) -> float:
    return _number(text, float, 0, most=1)


def probability(text: str) -> float:
    """Above 0, at most 1: how sure a prediction must be."""
    return _number(text, float, 0, most=1, strictly=True)


def open_fraction(text: str) -> float:
    """Strictly between 0 and 1: a share of the data carved off."""
    value = _number(text, float, 0, strictly=True)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"wants a number > 0 and < 1, not {text!r}")
    return value


def counts(text: str) -> list[int]:
    """'1,2,4': a comma-separated list of counts."""
    return [count(x.strip()) for x in text.split(",")]


def multipliers(text: str) -> list[float]:
    """'0.3,1,3': multipliers of a method's default learning rate, each > 0 and <= 1000."""
    return [_number(x.strip(), float, 0, strictly=True, most=1000) for x in text.split(",")]


def out_folder(text: str) -> str:
    """A folder the command may write into (it may not exist yet)."""
    check_writable(Path(text), folder=True)
    return text


def out_file(text: str) -> str:
    """A file the command may write (it may not exist yet)."""
    check_writable(Path(text), folder=False)
    return text


def check_writable(path: Path, folder: bool) -> None:
    """Refuse an output path that cannot be written, before a long run finds out at its end."""
    want = "folder" if folder else "file"
    if path.exists():
        if path.is_dir() != folder:
            raise argparse.ArgumentTypeError(f"{path} exists and is not a {want}")
        target = path if folder else path.parent
    else:
        target = next(p for p in path.parents if p.exists())  # ends at '.' or '/'
        if not target.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {path}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: no permission to write in {target}")


# ---------------------------------------------------------------------------------------
# The argparse table
# ---------------------------------------------------------------------------------------

def _task_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", required=required,
                   help="sst2, agnews, agnews_title, suite_sentiment, suite_topic, suite_struct, "
                        "csv / tsv / jsonl (with --train-file), or hub:NAME[:CONFIG]")
    g.add_argument("--data-dir", help="folder with sst2/ and ag_news/ (default: ../shared/data beside a checkout)")
    g.add_argument("--train-file", help="for --task csv/tsv/jsonl")
    g.add_argument("--eval-file", help="for --task csv/tsv/jsonl (default: hold out 10%% of --train-file)")
    g.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="file format if the extension does not say")
    g.add_argument("--columns", help="column names of a headerless file, comma-separated")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", help="classification label column (default: label)")
    g.add_argument("--response-column", help="makes a generation task: the response text column")
    g.add_argument("--instruction", help="instruction text (default: derived from the labels)")
    g.add_argument("--verbalizers", help="label words, e.g. '0=negative,1=positive'")
    g.add_argument("--max-train-examples", type=count, help="seeded, label-stratified subset of the train split")
    g.add_argument("--max-eval-examples", type=count, help="seeded subset of the held-out split")
    g.add_argument("--max-length", type=count, help="sequence length limit (default: the model's)")
    g.add_argument("--truncate", action="store_true", help="cut inputs that do not fit instead of stopping")


def _run_args(p: argparse.ArgumentParser, checkpoint_every: int = 0) -> None:
    """Flags of the commands that train with a fixed budget (compare, analyze data-efficiency)."""
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--grad-accum", type=count, default=1, help="micro-batches of --batch-size per step")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or a CPU that supports it)")
    _gpu_args(p)
    p.add_argument("--eval-every", type=count_or_zero, help="held-out monitor during training (default: off)")
    p.add_argument("--checkpoint-every", type=count_or_zero, default=checkpoint_every)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--lr-from", nargs="+", metavar="RESULTS",
                   help="results.json of earlier compares (e.g. --sweep-only): each row's lr by its label "
                        "(with --lr-sweep, the rows they do not name are swept)")
    p.add_argument("--jobs", type=count, default=1,
                   help="runs trained at a time, each in its own process with its share of the threads "
                        "(default 1; 2 finishes sooner on a 2-core CPU)")


class _WithMethodOptions(argparse.HelpFormatter):
    """Help that ends with every method's options, read from the configs when help is shown."""

    def format_help(self) -> str:
        from .methods import METHODS, describe, option_specs

        lines = ["method options (--option KEY=VALUE, repeatable):"]
        for name in METHODS:
            specs = option_specs(name)
            lines.append(f"  {name}:" + ("" if specs else " none"))
            lines += [f"    {s.name}: {describe(s)}" for s in specs]
        return super().format_help() + "\n" + "\n".join(lines) + "\n"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a method on a task, evaluate on held-out data",
                       formatter_class=_WithMethodOptions)
    _base_arg(p, "base model folder (default: the shipped base) or hf:NAME")
    _task_args(p)
    p.add_argument("--method", default="full",
                   help="full, lora_diffusion, lora, dora, adapter, bitfit or prefix (default: full)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable: e.g. --option r=8, --option ranks=16,16,16 (all below)")
    p.add_argument("--out", type=out_folder, help="run folder: adapter/, results.json, metrics.jsonl, checkpoints/")
    p.add_argument("--steps", type=count, help="optimiser steps (default 300)")
    p.add_argument("--epochs", type=epochs, help="instead of --steps")
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--grad-accum", type=count, default=1)
    p.add_argument("--lr", type=learning_rate, help="default: the method's own")
    p.add_argument("--warmup", type=fraction, default=0.06)
    p.add_argument("--weight-decay", type=non_negative, default=0.0)
    p.add_argument("--clip", type=non_negative, default=1.0)
    p.add_argument("--seed", type=seed, nargs="+", default=[0],
                   help="one or more seeds; with several, each run goes to OUT/seed-N and the "
                        "summary (mean ± std) to OUT/summary.json")
    p.add_argument("--results", type=out_file,
                   help="also write the result (or the summary over seeds) to this JSON file")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or a CPU that supports it)")
    _gpu_args(p)
    p.add_argument("--eval-every", type=count_or_zero, help="steps between held-out checks (default: steps/4)")
    p.add_argument("--checkpoint-every", type=count_or_zero, default=100)
    p.add_argument("--sampler-steps", type=count, default=64, help="denoising steps T at evaluation")
    p.add_argument("--cache-base", action="store_true",
                   help="lora_diffusion with injection=final: keep the frozen base's last states of each noised "
                        "example and run the base only for new ones (states without dropout; pays when examples "
                        "repeat, e.g. several epochs over a small set)")
    p.add_argument("--cache-base-mb", type=non_negative, default=CACHE_MB,
                   help="with --cache-base: keep at most this many MB of states (0: keep none, so the base runs "
                        "every step as without the cache, but without dropout)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=count)
    p.set_defaults(func=cmd_train)


def _add_eval_sample_app(sub) -> None:
    p = sub.add_parser("eval", help="held-out metrics of a base or an adapter; last line is JSON")
    p.add_argument("--adapter", nargs="+", help="adapter folder (or a train --out folder); several: all scored in "
                                                "mixed batches, each row its own adapter (lora_diffusion and lora)")
    _base_arg(p, "base model folder (default: the adapter's, or the shipped base)")
    _task_args(p, required=False)
    p.add_argument("--steps", type=count, default=64, help="denoising steps T")
    p.add_argument("--threshold", type=probability,
                   help="parallel decoding instead of T fixed steps: reveal every position predicted with at least "
                        "this probability (at least one per call), e.g. 0.9")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=out_file, help="also write the JSON here")
    p.add_argument("--threads", type=count)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text with the sampler")
    _base_arg(p, "base model folder (default: the shipped base)")
    p.add_argument("--adapter", nargs="+", help="adapter folder; several: the prompt decoded by each of them in one "
                                                "mixed batch (lora_diffusion and lora adapters)")
    p.add_argument("--prompt", help="input text (default: none, an all-[MASK] start)")
    p.add_argument("--instruction", help="instruction (default: the adapter's task instruction)")
    p.add_argument("--length", type=count, help="response tokens (default: 32, or the adapter's)")
    p.add_argument("--steps", type=count, default=64)
    p.add_argument("--threshold", type=probability, help="parallel decoding: reveal every position at least this sure")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--temperature", type=temperature, default=0.0)
    p.add_argument("--block-length", type=count, help="semi-autoregressive block length")
    p.add_argument("--n", type=count, default=1, help="number of samples")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--threads", type=count)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("app", help="start the Gradio workbench")
    p.add_argument("--port", type=port, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workspace", type=out_folder, default="runs/app", help="folder for the app's runs and adapters")
    p.add_argument("--data-dir", help="folder of the real datasets (default: ../shared/data beside a checkout)")
    _base_arg(p, "base model folder (default: the shipped base)")
    p.add_argument("--job-minutes", type=non_negative,
                   help="training time of one job before it stops (0 = no limit; default: 20)")
    p.set_defaults(func=cmd_app)


def _add_compare_profile(sub) -> None:
    p = sub.add_parser("compare", help="methods x seeds on one task with an equal budget: results.json + table",
                       formatter_class=_WithMethodOptions)
    _base_arg(p, "base model folder (default: the shipped base)")
    _task_args(p)
    p.add_argument("--preset", help="methods (= table5/7/9), ranks (= table10), modules (= table11), "
                                    "regularizers, schedule, injection, phases, ablations (every row of the six "
                                    "before it, once: run it first with the same --out), stepaware, cache (LoRA-"
                                    "Diffusion final with and without --cache-base, beside weight LoRA)")
    p.add_argument("--rows", nargs="+", metavar="LABEL",
                   help="only these rows of the preset, by label (as its table shows them)")
    p.add_argument("--methods", help="comma-separated method names instead of a preset")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="options for --methods rows")
    p.add_argument("--seed", type=seed, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=count, default=300)
    p.add_argument("--lr-sweep", type=multipliers,
                   help="multipliers of each method's default lr, tried on a validation split carved from the "
                        "train set, e.g. 0.3,1,3")
    p.add_argument("--validation-fraction", type=open_fraction, default=0.1)
    p.add_argument("--sweep-only", action="store_true", help="stop after the lr sweep (its table, one seed)")
    p.add_argument("--sampler-steps", type=count, default=64)
    p.add_argument("--no-profile", action="store_true", help="skip the peak-memory measurement per row")
    p.add_argument("--out", type=out_folder, required=True,
                   help="folder: results.json, results.md, one run folder per row/seed")
    p.add_argument("--results", type=out_file,
                   help="also write the results JSON here (and the markdown table beside it)")
    p.add_argument("--threads", type=count)
    _run_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", aliases=["profile"],
                       help="per method on one synthetic batch: step time, tokens/s, peak memory, FLOPs and MFU")
    p.add_argument("--methods", help="comma-separated (default: lora_diffusion,lora,full); ratios are given "
                                     "relative to the first")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="options (with a single method)")
    _base_arg(p, "base model folder (default: the shipped base)")
    p.add_argument("--preset", help="the rows of a compare preset instead of --methods (e.g. stepaware)")
    p.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows of the preset, by label")
    p.add_argument("--generation", action="store_true",
                   help="also time the sampler on a batch of the same shape, against the base alone")
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--prompt-length", type=count, default=48)
    p.add_argument("--response-length", type=count, default=16)
    p.add_argument("--steps", type=count, default=10)
    p.add_argument("--warmup", type=count_or_zero, default=3, help="untimed steps first")
    p.add_argument("--bf16", action="store_true")
    _gpu_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=count)
    p.add_argument("--out", type=out_file, help="write the JSON here")
    p.set_defaults(func=cmd_bench)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of trained adapters; each writes JSON + HTML figures")
    kinds = p.add_subparsers(dest="analysis", required=True)

    def analysis(name: str, help: str, adapters: bool = True, task: bool = True) -> argparse.ArgumentParser:
        a = kinds.add_parser(name, help=help)
        if adapters:
            a.add_argument("--adapters", nargs="+", required=True, help="adapter (or run) folders")
        _base_arg(a, "base model folder (default: the adapters' / the shipped base)")
        if task:
            _task_args(a, required=False)
        a.add_argument("--seed", type=seed, default=0)
        a.add_argument("--png", action="store_true", help="also write each figure as PNG (the figures extra)")
        a.add_argument("--threads", type=count)
        a.add_argument("--out", type=out_folder, required=True, help="output folder")
        a.set_defaults(func=cmd_analyze)
        return a

    a = analysis("effective-rank", "effective rank of each adapter's perturbation per denoising step")
    a.add_argument("--examples", type=count, default=64, help="held-out examples")
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps")
    a.add_argument("--per-layer", action="store_true", help="also per transformer block (each block's output change)")
    a = analysis("tsne", "2-D map of the per-step perturbations (t-SNE or PCA)")
    a.add_argument("--examples", type=count, default=64, help="held-out examples")
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps")
    a.add_argument("--projection", choices=["tsne", "pca"], default="tsne")
    a = analysis("forgetting", "held-out NELBO of generic text under each adapter against the base")
    a.add_argument("--examples", type=count, default=64, help="rows of 128 tokens per text source")
    a = analysis("composition", "a router over LoRA-Diffusion adapters, merges of weight-LoRA ones")
    a.add_argument("--lora-adapters", nargs="*", help="weight-LoRA adapters of the same tasks")
    a.add_argument("--examples", type=count, default=64, help="held-out examples per task")
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps")
    a.add_argument("--router-steps", type=count, default=300)
    a.add_argument("--quiet", action="store_true")
    a = analysis("scaling", "parameters, memory and speed against rank (fresh process per point)",
                 adapters=False, task=False)
    a.add_argument("--ranks", type=counts, default="1,2,4,8,16,32,64,128")
    a.add_argument("--gen-ranks", type=counts, default="8,128")
    a.add_argument("--gen-batch-sizes", type=counts, default="1,8,32")
    a.add_argument("--gen-lengths", type=counts, default="16,64,128")
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps of the generation timings")
    a.add_argument("--batch-size", type=count, default=16)
    a.add_argument("--bf16", action="store_true")
    a.add_argument("--device", default="auto")
    a.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per point (faster; memory the "
                        "allocator already holds then hides part of the peak)")
    a = analysis("mixed-batch", "generation throughput when each row of a batch has its own adapter "
                 "(LoRA-Diffusion, weight LoRA)",
                 adapters=False, task=False)
    a.add_argument("--adapter-counts", type=counts, default="8,32", help="distinct adapters mixed in the batch")
    a.add_argument("--batch-size", type=count, default=32)
    a.add_argument("--response-length", type=count, default=16)
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps")
    a = analysis("data-efficiency", "held-out score against training-set size", adapters=False)
    a.add_argument("--sizes", type=counts, default="100,500,2000,8000", help="training-set sizes")
    a.add_argument("--methods", default="lora_diffusion,lora,full")
    a.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2])
    a.add_argument("--steps", type=count, default=300, help="training steps")
    a.add_argument("--sampler-steps", type=count, default=16, help="denoising steps")
    _run_args(a)


def _gpu_args(p) -> None:
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls on an NVIDIA GPU (Ampere or later)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (the first steps compile)")


def _base_arg(p, help: str) -> None:
    p.add_argument("--base", help=help)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a base whose folder brings its own Python code (config.json auto_map) run it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-base", help="turn MiniLM-L6 into a masked diffusion LM (writes assets/base)")
    p.add_argument("--data-dir", help="text data folder (default: ../shared/data beside a checkout)")
    p.add_argument("--out", type=out_folder, help="output folder (default: assets/base)")
    p.add_argument("--work-dir", type=out_folder, help="checkpoints and metrics (default: runs/prepare-base)")
    p.add_argument("--steps", type=count, default=1600)
    p.add_argument("--batch-size", type=count, default=32)
    p.add_argument("--seq-len", type=count, default=128)
    p.add_argument("--lr", type=learning_rate, default=2e-4)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=count)
    p.set_defaults(func=cmd_prepare_base)

    _add_train(sub)
    _add_eval_sample_app(sub)
    _add_compare_profile(sub)
    _add_analyze(sub)
    p = sub.add_parser("report", help="markdown table of results files (train --results, eval --out)")
    p.add_argument("results", nargs="+", help="JSON results files")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("lessons", help="train the adapters the teaching notebooks load, once, into their cache "
                                       "(LORA_DIFFUSION_LESSONS, else runs/lessons); cached ones are skipped")
    _base_arg(p, "base model folder (default: the shipped base, the notebooks' own)")
    p.add_argument("--threads", type=count)
    p.set_defaults(func=cmd_lessons)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if world_size() > 1 and args.command not in ("train", "compare"):
        _log(f"error: `{args.command}` runs in one process; under accelerate launch or torchrun only train "
             "and compare are offered")
        return 2
    if getattr(args, "trust_remote_code", False):
        os.environ[TRUST_REMOTE_CODE] = "1"  # an environment variable reaches compare's worker processes too
    finished = False
    try:
        args.func(args)
        finished = True
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a run with --out resumes from its last checkpoint)", file=sys.stderr)
        return 130
    finally:
        close_process_group(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
