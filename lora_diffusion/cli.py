"""`lora-diffusion`: fine-tune, compare and inspect PEFT methods on a masked diffusion LM.

Bad input ends with one line `error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .errors import UserError


def _task_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", required=required,
                   help="sst2, agnews, agnews_title, suite_sentiment, suite_topic, suite_struct, "
                        "csv / tsv / jsonl (with --train-file), or hub:NAME[:CONFIG]")
    g.add_argument("--data-dir", help="folder with sst2/ and ag_news/ (default: ../shared/data)")
    g.add_argument("--train-file", help="for --task csv/tsv/jsonl")
    g.add_argument("--eval-file", help="for --task csv/tsv/jsonl (default: hold out 10%% of --train-file)")
    g.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="file format if the extension does not say")
    g.add_argument("--columns", help="column names of a headerless file, comma-separated")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", help="classification label column (default: label)")
    g.add_argument("--response-column", help="makes a generation task: the response text column")
    g.add_argument("--instruction", help="instruction text (default: derived from the labels)")
    g.add_argument("--verbalizers", help="label words, e.g. '0=negative,1=positive'")
    g.add_argument("--max-train-examples", type=int, help="seeded, label-stratified subset of the train split")
    g.add_argument("--max-eval-examples", type=int, help="seeded subset of the held-out split")
    g.add_argument("--max-length", type=int, help="sequence length limit (default: the model's)")
    g.add_argument("--truncate", action="store_true", help="cut inputs that do not fit instead of stopping")


def _load_task(args, seed: int):
    from .data import load_task

    for flag in ("max_train_examples", "max_eval_examples", "max_length"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    return load_task(args.task, data_dir=args.data_dir, train_file=args.train_file, eval_file=args.eval_file,
                     fmt=args.format, text_column=args.text_column, label_column=args.label_column,
                     response_column=args.response_column, columns=args.columns,
                     instruction=args.instruction, verbalizers=args.verbalizers,
                     max_train=getattr(args, "max_train_examples", None),
                     max_eval=args.max_eval_examples, seed=seed)


def parse_options(pairs: list[str] | None) -> dict:
    """['r=8', 'ranks=16,16,16', 'condition=false'] -> {'r': 8, 'ranks': [16, 16, 16], 'condition': False}."""
    def value(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    options = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option wants KEY=VALUE, got {pair!r}")
        raw = raw.strip()
        if raw.lower() in ("true", "false"):
            raw = raw.lower()
        options[key.strip()] = [value(v) for v in raw.split(",")] if "," in raw and not raw.startswith("[") else value(raw)
    return options


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_prepare_base(args) -> None:
    from .prepare_base import DEFAULT_DATA, prepare_base
    from .backbone import SHIPPED_BASE

    _threads(args.threads)
    card = prepare_base(data_dir=args.data_dir or DEFAULT_DATA, out=args.out or SHIPPED_BASE,
                        work_dir=args.work_dir, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, seed=args.seed, bf16=args.bf16)
    print(json.dumps({"out": str(args.out or SHIPPED_BASE), "heldout": card["heldout"]}))


def cmd_train(args) -> None:
    from pathlib import Path

    from .backbone import load_backbone
    from .evaluate import aggregate_seeds
    from .io import write_json
    from .methods import make_method
    from .train import TrainConfig, fine_tune

    _threads(args.threads)
    if args.steps is not None and args.epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if args.batch_size < 1 or args.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be positive")
    if len(set(args.seed)) != len(args.seed):
        raise UserError(f"--seed lists a seed twice: {args.seed}")
    several = len(args.seed) > 1
    results = []
    for seed in args.seed:
        task = _load_task(args, seed)
        backbone = load_backbone(args.base)  # a fresh base per seed: full fine-tuning changes it
        method = make_method(args.method, **parse_options(args.option))
        if args.epochs is not None:
            steps = math.ceil(args.epochs * len(task.train) / (args.batch_size * args.grad_accum))
        else:
            steps = args.steps if args.steps is not None else 300
        if steps < 1:
            raise UserError("--steps/--epochs must be positive")
        eval_every = args.eval_every if args.eval_every is not None else max(steps // 4, 1)
        config = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, seed=seed,
                             bf16=args.bf16, eval_every=eval_every, checkpoint_every=args.checkpoint_every,
                             device=args.device)
        print(f"task {task.name}: {len(task.train)} train / {len(task.eval)} held-out examples; "
              f"method {method.name}; seed {seed}; {steps} steps of {args.batch_size * args.grad_accum}",
              file=sys.stderr)
        out = Path(args.out) / f"seed-{seed}" if (args.out and several) else args.out
        result = fine_tune(backbone, task, method, config, out_dir=out, max_length=args.max_length,
                           truncate=args.truncate, sampler_steps=args.sampler_steps)
        result.pop("model")
        if out:
            print(f"adapter: {os.path.join(out, 'adapter')}  results: {os.path.join(out, 'results.json')}",
                  file=sys.stderr)
        results.append(result)
    for r in results:
        print(_headline(r), file=sys.stderr)
    final = aggregate_seeds(results) if several else results[0]
    summary_path = args.results or (os.path.join(args.out, "summary.json") if (args.out and several) else None)
    if summary_path:
        write_json(summary_path, final)
        print(f"summary: {summary_path}", file=sys.stderr)
    print(json.dumps(final))


def _headline(r: dict) -> str:
    """One readable line of held-out metrics (the JSON follows on stdout)."""
    where = f"{r['task']} held-out ({r['n_eval']} examples)"
    if "accuracy" in r:
        return (f"seed {r.get('seed', 0)}: {where}: generative accuracy {r['accuracy']:.3f}, verbalizer "
                f"accuracy {r['verbalizer_accuracy']:.3f} (majority class {r['chance']:.3f})")
    return f"seed {r.get('seed', 0)}: {where}: ROUGE-L {r['rouge_l']:.3f}, token F1 {r['token_f1']:.3f}"


def cmd_eval(args) -> None:
    from .backbone import load_backbone
    from .diffusion import DiffusionLM
    from .evaluate import evaluate_task
    from .io import load_adapter, write_json

    _threads(args.threads)
    response_length = max_length = None
    method_name = "base"
    if args.adapter:
        model, method, config = load_adapter(args.adapter, base=args.base)
        method_name = method.name
        response_length, max_length = config["response_length"], config["max_length"]
        if args.task is None:
            args.task = config["task"]["name"]
    else:
        if args.task is None:
            raise UserError("give --task (or --adapter, whose task is used)")
        model = DiffusionLM(load_backbone(args.base))
    task = _load_task(args, args.seed)
    result = evaluate_task(model, task, response_length=response_length,
                           max_length=args.max_length or max_length, steps=args.steps,
                           remasking=args.remasking, batch_size=args.batch_size, seed=args.seed,
                           truncate=args.truncate)
    result["method"] = method_name
    result["adapter"] = args.adapter
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result))


def cmd_sample(args) -> None:
    import torch

    from .backbone import load_backbone
    from .data import Encoded, collate
    from .diffusion import DiffusionLM, sample
    from .io import load_adapter

    _threads(args.threads)
    if args.adapter:
        model, _, config = load_adapter(args.adapter, base=args.base)
        instruction = args.instruction if args.instruction is not None else (config["task"]["instruction"] or "")
        length = args.length or config["response_length"]
    else:
        model = DiffusionLM(load_backbone(args.base))
        instruction, length = args.instruction or "", args.length or 32
    bb = model.backbone
    tok = bb.tokenizer
    if length < 1 or args.steps < 1:
        raise UserError("--length and --steps must be positive")
    if args.prompt is None and not instruction:  # unconditional: [CLS] + all-[MASK]
        prompt, ins = [bb.cls_id], []
    else:
        ins = tok(instruction, add_special_tokens=False)["input_ids"]
        body = tok(args.prompt or "", add_special_tokens=False)["input_ids"]
        prompt = [bb.cls_id] + ins + [bb.sep_id] + body + [bb.sep_id]
    if len(prompt) + length > bb.max_length:
        raise UserError(f"prompt + {length} response tokens = {len(prompt) + length} tokens, longer than "
                        f"the model's {bb.max_length} positions")
    enc = Encoded([prompt] * args.n, [[bb.mask_id] * length] * args.n, [ins] * args.n, length)
    batch = collate(enc, list(range(args.n)), bb.pad_id)
    generator = torch.Generator().manual_seed(args.seed)
    tokens, _ = sample(model, **batch, steps=args.steps, remasking=args.remasking,
                       temperature=args.temperature, block_length=args.block_length, generator=generator)
    for row in range(args.n):
        ids = tokens[row][batch["response_mask"][row]].tolist()
        text = tok.decode(ids, skip_special_tokens=False).replace(tok.sep_token, " | ")
        print(" ".join(text.split()))


def _train_config(args, seed: int = 0):
    from .train import TrainConfig

    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=1, seed=seed, bf16=args.bf16,
                       eval_every=args.eval_every or 0, checkpoint_every=args.checkpoint_every,
                       device=args.device)


def cmd_compare(args) -> None:
    from .compare import learning_rates_from, markdown, run_compare, specs_from

    _threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    specs = specs_from(args.preset, methods, parse_options(args.option))
    if len(set(args.seed)) != len(args.seed):
        raise UserError(f"--seed lists a seed twice: {args.seed}")
    task = _load_task(args, 0)  # one training subset for every row and seed: an equal budget
    lr_sweep = [float(x) for x in args.lr_sweep.split(",")] if args.lr_sweep else None
    learning_rates = learning_rates_from(*args.lr_from) if args.lr_from else None
    log = lambda message: print(message, file=sys.stderr, flush=True)
    results = run_compare(task, specs, args.seed, _train_config(args), args.out, base=args.base,
                          lr_sweep=lr_sweep, validation_fraction=args.validation_fraction,
                          sampler_steps=args.sampler_steps, profile=not (args.no_profile or args.sweep_only),
                          progress=not args.quiet, log=log, sweep_only=args.sweep_only,
                          learning_rates=learning_rates, results_file=args.results, jobs=args.jobs)
    print(markdown(results))
    print(f"results: {os.path.join(args.out, 'results.json')}", file=sys.stderr)


def cmd_profile(args) -> None:
    from .analysis.profile import profile_training
    from .io import write_json

    names = [m.strip() for m in args.methods.split(",")]
    if args.option and len(names) > 1:
        raise UserError("--option needs a single method in --methods")
    rows = []
    for name in names:
        rows.append(profile_training(name, parse_options(args.option),
                                     base=args.base or "shipped", batch_size=args.batch_size,
                                     prompt_length=args.prompt_length, response_length=args.response_length,
                                     steps=args.steps, warmup=args.warmup, bf16=args.bf16, device=args.device,
                                     threads=args.threads))
        r = rows[-1]
        print(f"{name}: {r['sec_per_step']:.4f} s/step, peak {r['peak_memory_bytes'] / 2**20:.0f} MB, "
              f"{r['trainable_parameters']:,} trainable", file=sys.stderr)
    reference = rows[0]
    ratios = {r["method"]: {"step_time_ratio": reference["sec_per_step"] / r["sec_per_step"],
                            "peak_memory_ratio": reference["peak_memory_bytes"] / r["peak_memory_bytes"]}
              for r in rows[1:]}
    out = {"reference": reference["method"], "ratios_of_reference_to": ratios, "rows": rows}
    if args.out:
        write_json(args.out, out)
    print(json.dumps({"reference": reference["method"], "ratios_of_reference_to": ratios,
                      "rows": [{k: r[k] for k in ("method", "sec_per_step", "peak_memory_bytes",
                                                  "trainable_parameters", "device")} for r in rows]}))


def cmd_analyze(args) -> None:
    """Every analysis writes OUT/<name>.json and one HTML page per figure."""
    from pathlib import Path

    from .io import write_figure, write_json, write_text

    _threads(args.threads)
    out = Path(args.out)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    kind = args.analysis
    if kind == "effective-rank":
        from .analysis.rank import effective_rank_figure, effective_rank_report

        report = effective_rank_report(args.adapters, base=args.base, task_name=args.task, data_dir=args.data_dir,
                                       n_examples=args.examples, steps=args.sampler_steps, seed=args.seed)
        figures = {"effective_rank": effective_rank_figure(report)}
        summary = {r["label"]: [round(x, 2) for x in r["effective_rank"]] for r in report["methods"]}
    elif kind == "tsne":
        from .analysis.tsne import trajectory_figure, trajectory_map

        report = trajectory_map(args.adapters, base=args.base, task_name=args.task, data_dir=args.data_dir,
                                n_examples=args.examples, steps=args.sampler_steps, method=args.projection,
                                seed=args.seed)
        figures = {f"tsne_{which}_by_{colour}": trajectory_figure(report, which, colour)
                   for which in ("perturbations", "base") for colour in ("task", "step")}
        summary = {w: round(report[w]["trustworthiness"], 3) for w in ("perturbations", "base")}
    elif kind == "forgetting":
        from .analysis.forgetting import forgetting_figure, forgetting_report

        report = forgetting_report(args.adapters, base=args.base, data_dir=args.data_dir, rows=args.examples,
                                   seed=args.seed)
        figures = {"forgetting": forgetting_figure(report)}
        summary = {m["label"]: {s: round(v["nelbo"], 3) for s, v in m["scores"].items()} for m in report["models"]}
    elif kind == "composition":
        from .analysis.composition import (composition_markdown, composition_report, interference_figure,
                                           router_weights_figure)

        report = composition_report(args.adapters, lora_adapters=args.lora_adapters, base=args.base,
                                    data_dir=args.data_dir, max_eval=args.examples, sampler_steps=args.sampler_steps,
                                    router_steps=args.router_steps, seed=args.seed, out_dir=out,
                                    progress=not args.quiet)
        figures = {"router_weights": router_weights_figure(report), "interference": interference_figure(report)}
        write_text(out / "composition.md", composition_markdown(report) + "\n")
        summary = composition_markdown(report)
    elif kind == "scaling":
        from .analysis.scaling import rank_scaling_report, scaling_figures

        ints = lambda text: [int(x) for x in text.split(",")]
        report = rank_scaling_report(ranks=ints(args.ranks), base=args.base or "shipped", batch_size=args.batch_size,
                                     gen_ranks=ints(args.gen_ranks), gen_batch_sizes=ints(args.gen_batch_sizes),
                                     gen_lengths=ints(args.gen_lengths), gen_steps=args.sampler_steps,
                                     bf16=args.bf16, device=args.device, threads=args.threads,
                                     isolated=not args.in_process, log=log)
        figures = scaling_figures(report)
        summary = {f"{r['method']}{'' if r['rank'] is None else ' r=' + str(r['rank'])}":
                   {"s/step": round(r["sec_per_step"], 4), "peak MB": round(r["peak_memory_bytes"] / 2**20)}
                   for r in report["train"]}
    elif kind == "data-efficiency":
        from .analysis.data_efficiency import data_efficiency_figure, data_efficiency_report
        from .compare import learning_rates_from

        if not args.task:
            raise UserError("data-efficiency needs --task")
        task = _load_task(args, 0)
        report = data_efficiency_report(task, [int(x) for x in args.sizes.split(",")],
                                        methods=[m.strip() for m in args.methods.split(",")], seeds=args.seeds,
                                        config=_train_config(args), out_dir=out / "runs", base=args.base,
                                        sampler_steps=args.sampler_steps, progress=not args.quiet, log=log,
                                        learning_rates=learning_rates_from(*args.lr_from) if args.lr_from else None,
                                        jobs=args.jobs)
        figures = {"data_efficiency": data_efficiency_figure(report)}
        summary = [(p["n_train"], p["method"], round(p.get("accuracy", p.get("rouge_l"))["mean"], 4))
                   for p in report["points"]]
    else:  # argparse restricts the choices
        raise UserError(f"unknown analysis {kind!r}")
    name = kind.replace("-", "_")
    write_json(out / f"{name}.json", report)
    for fig_name, figure in figures.items():
        write_figure(out / f"{fig_name}.html", figure, png=args.png)
    print(f"wrote {out / (name + '.json')} and {', '.join(f + '.html' for f in figures)}", file=sys.stderr)
    print(summary if isinstance(summary, str) else json.dumps(summary))


def cmd_report(args) -> None:
    from .evaluate import markdown_table
    from .io import read_json

    print(markdown_table([read_json(path) for path in args.results]))


def cmd_app(args) -> None:
    import runpy

    from .backbone import REPO_ROOT

    script = REPO_ROOT / "app" / "main.py"
    if not script.is_file():
        raise UserError(f"the app is not in this installation ({script} is missing); run it from a checkout")
    sys.argv = [str(script), "--port", str(args.port), "--host", args.host, "--workspace", args.workspace]
    runpy.run_path(str(script), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-base", help="turn MiniLM-L6 into a masked diffusion LM (writes assets/base)")
    p.add_argument("--data-dir", help="text data folder (default: ../shared/data)")
    p.add_argument("--out", help="output folder (default: assets/base)")
    p.add_argument("--work-dir", help="checkpoints and metrics (default: runs/prepare-base)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_prepare_base)

    p = sub.add_parser("train", help="fine-tune a method on a task, evaluate on held-out data")
    p.add_argument("--base", help="base model folder (default: the shipped base) or hf:NAME")
    _task_args(p)
    p.add_argument("--method", default="full",
                   help="full, lora_diffusion, lora, dora, adapter, bitfit or prefix (default: full)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option, repeatable: e.g. --option r=8, --option ranks=16,16,16, "
                        "--option injection=blocks")
    p.add_argument("--out", help="run folder: adapter/, results.json, metrics.jsonl, checkpoints/")
    p.add_argument("--steps", type=int, help="optimiser steps (default 300)")
    p.add_argument("--epochs", type=float, help="instead of --steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="default: the method's own")
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one or more seeds; with several, each run goes to OUT/seed-N and the "
                        "summary (mean ± std) to OUT/summary.json")
    p.add_argument("--results", help="also write the result (or the summary over seeds) to this JSON file")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU, or a CPU that supports it)")
    p.add_argument("--eval-every", type=int, help="steps between held-out checks (default: steps/4)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--sampler-steps", type=int, default=64, help="denoising steps T at evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out metrics of a base or an adapter; last line is JSON")
    p.add_argument("--adapter", help="adapter folder (or a train --out folder)")
    p.add_argument("--base", help="base model folder (default: the adapter's, or the shipped base)")
    _task_args(p, required=False)
    p.add_argument("--steps", type=int, default=64, help="denoising steps T")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("app", help="start the Gradio workbench")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workspace", default="runs/app", help="folder for the app's runs and adapters")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("sample", help="generate text with the sampler")
    p.add_argument("--base", help="base model folder (default: the shipped base)")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--prompt", help="input text (default: none, an all-[MASK] start)")
    p.add_argument("--instruction", help="instruction (default: the adapter's task instruction)")
    p.add_argument("--length", type=int, help="response tokens (default: 32, or the adapter's)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--block-length", type=int, help="semi-autoregressive block length")
    p.add_argument("--n", type=int, default=1, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="methods x seeds on one task with an equal budget: results.json + table")
    p.add_argument("--base", help="base model folder (default: the shipped base)")
    _task_args(p)
    p.add_argument("--preset", help="methods (= table5/7/9), ranks (= table10), modules (= table11), "
                                    "regularizers, schedule, injection")
    p.add_argument("--methods", help="comma-separated method names instead of a preset")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="options for --methods rows")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr-sweep", help="multipliers of each method's default lr, tried on a validation split "
                                      "carved from the train set, e.g. 0.3,1,3")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--sweep-only", action="store_true", help="stop after the lr sweep (its table, one seed)")
    p.add_argument("--lr-from", nargs="+", metavar="RESULTS",
                   help="results.json of earlier compares (e.g. --sweep-only): their rows' lr")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--eval-every", type=int, help="held-out monitor during training (default: off)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--sampler-steps", type=int, default=64)
    p.add_argument("--no-profile", action="store_true", help="skip the peak-memory measurement per row")
    p.add_argument("--out", required=True, help="folder: results.json, results.md, one run folder per row/seed")
    p.add_argument("--results", help="also write the results JSON here (and the markdown table beside it)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at a time, each in its own process with its share of the threads "
                        "(default 1; 2 finishes sooner on a 2-core CPU)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile", help="train step time and peak memory of methods on one synthetic batch")
    p.add_argument("--methods", default="lora_diffusion,lora,full",
                   help="comma-separated; ratios are given relative to the first")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="options (with a single method)")
    p.add_argument("--base", help="base model folder (default: the shipped base)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=48)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="write the JSON here")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("analyze", help="analyses of trained adapters; each writes JSON + HTML figures")
    p.add_argument("analysis", choices=["effective-rank", "tsne", "forgetting", "composition", "scaling",
                                        "data-efficiency"])
    p.add_argument("--adapters", nargs="*", default=[], help="adapter (or run) folders")
    p.add_argument("--lora-adapters", nargs="*", help="composition: weight-LoRA adapters of the same tasks")
    p.add_argument("--base", help="base model folder (default: the adapters' / the shipped base)")
    _task_args(p, required=False)
    p.add_argument("--examples", type=int, default=64, help="held-out examples (rows of text for forgetting)")
    p.add_argument("--sampler-steps", type=int, default=16, help="denoising steps")
    p.add_argument("--projection", choices=["tsne", "pca"], default="tsne")
    p.add_argument("--router-steps", type=int, default=300)
    p.add_argument("--png", action="store_true", help="also write each figure as PNG (the figures extra)")
    p.add_argument("--ranks", default="1,2,4,8,16,32,64,128")
    p.add_argument("--gen-ranks", default="8,128")
    p.add_argument("--gen-batch-sizes", default="1,8,32")
    p.add_argument("--gen-lengths", default="16,64,128")
    p.add_argument("--sizes", default="100,500,2000,8000", help="data-efficiency: training-set sizes")
    p.add_argument("--methods", default="lora_diffusion,lora,full", help="data-efficiency: methods")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="data-efficiency: training steps")
    p.add_argument("--lr-from", nargs="+", metavar="RESULTS",
                   help="data-efficiency: each method's lr from earlier compares' results.json (default: its own)")
    p.add_argument("--jobs", type=int, default=1, help="data-efficiency: runs trained at a time")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="scaling: measure in this process instead of a fresh one per point (faster; "
                        "memory the allocator already holds then hides part of the peak)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="markdown table of results files (train --results, eval --out)")
    p.add_argument("results", nargs="+", help="JSON results files")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a run with --out resumes from its last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
