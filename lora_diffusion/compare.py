"""`lora-diffusion compare`: methods x seeds on one task, with an equal budget, honestly scored.

Every row trains on the same training examples for the same number of steps and batch
size, from a fresh copy of the base, and is scored on the task's held-out split. An
optional learning-rate sweep picks each row's learning rate on a validation split
carved from the training set (never the reported split), with the first seed.

Results are written after every finished run (`results.json`, `results.md`), and a run
whose `results.json` already exists is read back instead of trained again, so a killed
comparison resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbone import load_backbone
from .data import SPLIT_SEED, Task, encode
from .distributed import is_main, micro_batches_per_step, world_size
from .errors import UserError, quoted
from .files import read_json, write_json, write_text
from .methods import make_method, method_class, method_config, stored_config, typed_options
from .metrics import mean_std, metric_of, over_seeds, percent, score
from .paths import SHIPPED_BASE
from .profiling import profile_training
from .runs import fine_tune
from .training import TrainConfig


@dataclass
class Spec:
    """One row of a comparison: a method with its options (and, optionally, a fixed lr and
    training settings of its own: TrainConfig fields over the comparison's, e.g. {"cache_base": True})."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    lr: float | None = None
    train_settings: dict = field(default_factory=dict)


def _ld(label, **options):
    """A LoRA-Diffusion row; its options are checked by the method's config when the module loads."""
    return Spec(label, "lora_diffusion", typed_options("lora_diffusion", options))


# The paper's tables (its Tables 5-11), made honest: equal budget, held-out data, seeds.
PRESETS: dict[str, list[Spec]] = {
    # LoRA-Diffusion at `final`, as the table in results/compare_sst2 was run (its default
    # then), at about weight LoRA's parameter count; the other sites: the stepaware preset.
    "methods": [Spec("full", "full"), _ld("lora_diffusion", injection="final"), Spec("lora", "lora"),
                Spec("dora", "dora"), Spec("adapter", "adapter"), Spec("bitfit", "bitfit"),
                Spec("prefix", "prefix")],
    # The ablations vary one knob of the default (blocks on every position, adaptive 64/32/8,
    # k = 2, both regularisers, per-phase modules), labelled "default" in each, so that the
    # presets can share one --out folder and the default trains once (`--preset ablations`
    # trains every row of all six).
    "ranks": [_ld(f"uniform r={r}", schedule="uniform", rank=r) for r in (8, 16, 32, 64)] + [_ld("default")],
    "modules": [_ld(f"k={k}", k=k) if k != 2 else _ld("default") for k in (1, 2, 4, 8)],
    "regularizers": [_ld("default"), _ld("rank only", lambda_orth=0.0), _ld("orth only", lambda_rank=0.0),
                     _ld("none", lambda_rank=0.0, lambda_orth=0.0)],
    "schedule": [_ld("default"), _ld("inverted 8/32/64", schedule="inverted"),
                 _ld("uniform r=35", schedule="uniform", rank=35)],
    # The same phase modules (64/32/8, k = 2) at each site; their parameter counts differ
    # (the stepaware preset compares the sites at LoRA's budget).
    "injection": [_ld("final", injection="final"), _ld("blocks, denoised", injection="blocks", blocks_positions="denoised"),
                  _ld("default"), _ld("weights", injection="weights")],
    # Phase-specific modules against one shared set of the same parameters, at three sites.
    "phases": [_ld("default"), _ld("shared", phases="shared"),
               _ld("final", injection="final"), _ld("final, shared", injection="final", phases="shared"),
               _ld("weights 6/3/1 k=1", injection="weights", targets="attention", k=1, ranks=(6, 3, 1)),
               _ld("weights 6/3/1 k=1, shared", injection="weights", targets="attention", k=1, ranks=(6, 3, 1),
                   phases="shared")],
    # Does knowing the step help an adapter? Weight LoRA r=16 (294,912 parameters on the
    # shipped base) against the step-aware forms: LoRA-Diffusion at each injection site at
    # no more parameters (ranks cut in about the schedule's proportions where needed),
    # T-LoRA-style LoRA (LoRA's count) and NaRA-style LoRA (LoRA's plus its hypernetwork,
    # +6%). The labels "lora" and "lora_diffusion" (LoRA-Diffusion `final`, the methods
    # table's default when it was run) are the methods table's, so that table's swept
    # learning rates carry over with --lr-from.
    "stepaware": [Spec("lora", "lora"), Spec("nara", "nara"), Spec("tlora", "tlora"),
                  _ld("lora_diffusion", injection="final"),
                  _ld("LD blocks 12/6/1", injection="blocks", blocks_positions="denoised", ranks=(12, 6, 1)),
                  _ld("LD blocks all 12/6/1", injection="blocks", blocks_positions="all", ranks=(12, 6, 1)),
                  _ld("LD weights 6/3/1 k=1", injection="weights", targets="attention", k=1, ranks=(6, 3, 1))],
    # The frozen base computed once (`--cache-base`, base_cache.py): LoRA-Diffusion `final`
    # trained with and without the cache, beside weight LoRA, in one run.
    "cache": [Spec("lora", "lora"), _ld("lora_diffusion", injection="final"),
              replace(_ld("lora_diffusion cached", injection="final"), train_settings={"cache_base": True})],
}
ABLATIONS = ("ranks", "modules", "regularizers", "schedule", "injection", "phases")


def _union(presets) -> list[Spec]:
    """Every row of `presets` once (a label names the same row in each of them)."""
    rows = {}
    for spec in (spec for name in presets for spec in PRESETS[name]):
        if rows.setdefault(spec.label, spec) != spec:
            raise ValueError(f"label {spec.label!r} names two different rows")
    return list(rows.values())


PRESETS["ablations"] = _union(ABLATIONS)
ALIASES = {"table5": "methods", "table7": "methods", "table9": "methods", "table10": "ranks", "table11": "modules"}


def specs_from(preset: str | None = None, methods: list[str] | None = None, options: dict | None = None,
               rows: list[str] | None = None) -> list[Spec]:
    """The rows of a preset (only those labelled in `rows`, if given), or one row per method
    name (each with the same extra options)."""
    if preset:
        name = ALIASES.get(preset, preset)
        if name not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose from: {', '.join(list(PRESETS) + list(ALIASES))}")
        if not rows:
            return PRESETS[name]
        labels = [spec.label for spec in PRESETS[name]]
        unknown = [row for row in rows if row not in labels]
        if unknown:
            raise UserError(f"preset {preset!r} has no row {quoted(unknown[0])}; its rows: {', '.join(labels)}")
        return [spec for spec in PRESETS[name] if spec.label in rows]
    if rows:
        raise UserError("--rows picks rows of a --preset")
    if not methods:
        raise UserError("give --preset or --methods")
    return [Spec(m, m, typed_options(m, options)) for m in methods]


def validation_split(task: Task, fraction: float) -> Task:
    """A copy of `task` whose eval split is a seeded slice of its train split (for tuning)."""
    rows = task.train[:]
    random.Random(SPLIT_SEED).shuffle(rows)
    cut = max(1, int(len(rows) * fraction))
    if cut >= len(rows):
        raise UserError("the training set is too small to carve a validation split from")
    return Task(task.name, task.kind, rows[cut:], rows[:cut], task.labels, source=f"{task.source} (validation split)",
                info=dict(task.info))


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


@dataclass(frozen=True)
class ChosenRate:
    """A learning rate an earlier comparison chose for one row, with what that row trained."""

    lr: float
    method: str
    config: dict | None  # the row's resolved method options; None in files older than this field
    source: str


def learning_rates_from(*paths) -> dict[str, ChosenRate]:
    """label -> lr chosen by earlier comparisons (e.g. `--sweep-only` runs); later files win."""
    chosen = {}
    for path in paths:
        results = read_json(path)
        rows = results.get("rows") if isinstance(results, dict) else None
        if not rows or not all(isinstance(r, dict) and isinstance(r.get("label"), str) and
                               isinstance(r.get("lr"), (int, float)) and r["lr"] > 0 for r in rows):
            raise UserError(f"{path} is not the results.json of a `lora-diffusion compare` (rows with a label and an lr)")
        if any(not isinstance(r.get("config", {}), dict) for r in rows):
            raise UserError(f"{path}: a row's config is not a JSON object")
        chosen.update({row["label"]: ChosenRate(row["lr"], row.get("method"),
                                                row.get("config") or _resolved(row.get("method"), row.get("options")),
                                                str(path)) for row in rows})
    return chosen


def _carried_lr(spec: Spec, chosen) -> float | None:
    """The lr `chosen` for a row of this label (a number, or a ChosenRate from a file), refused
    where that row trained another method or other options: a rate swept for one injection
    site does not carry to another (e.g. after a default changed)."""
    if not isinstance(chosen, ChosenRate):
        return chosen
    mine = method_config(spec.method, spec.options).to_dict()
    if chosen.method not in (None, spec.method):
        raise UserError(f"row {quoted(spec.label)}: {chosen.source} chose its lr for method {chosen.method}, "
                        f"not {spec.method}")
    # options that either configuration ignores cannot make the rates differ
    config_class = method_class(spec.method).Config
    ignored = config_class.ignored(mine).keys() | config_class.ignored(chosen.config or {}).keys()
    differ = sorted(k for k in (chosen.config or {}).keys() & mine.keys() - ignored if chosen.config[k] != mine[k])
    if differ:
        k = differ[0]
        raise UserError(f"row {quoted(spec.label)}: {chosen.source} chose its lr for {k}={chosen.config[k]}, "
                        f"this row trains {k}={mine[k]}; sweep it again (--lr-sweep) or leave that file out")
    return chosen.lr


def run_compare(task: Task, specs: list[Spec], seeds: list[int], config: TrainConfig, out_dir, base=None,
                lr_sweep: list[float] | None = None, validation_fraction: float = 0.1,
                sampler_steps: int = 64, profile: bool = True, progress: bool = True, log=print,
                sweep_only: bool = False, learning_rates: dict | None = None, results_file=None,
                jobs: int = 1) -> dict:
    """Train and evaluate every spec for every seed; returns (and writes) the results.

    `config`'s lr is ignored (each method's own, or the sweep's); `lr_sweep` multiplies each
    method's default lr, e.g. [0.3, 1, 3]; `sweep_only` stops after the sweep (the rows then
    carry only the chosen lr and the validation scores); `learning_rates` (label -> lr, or a ChosenRate from
    `learning_rates_from`, checked against the row) fixes
    rows' learning rates, e.g. from a sweep (with `lr_sweep`, the rows it does not name are
    swept); `results_file` also receives the results (and a
    .md table beside it); `jobs` > 1 trains that many runs at a time in separate processes
    (the threads split between them).
    """
    learning_rates = learning_rates or {}
    _check_request(specs, lr_sweep, sweep_only, learning_rates, jobs)
    out_dir = Path(out_dir)
    results = {"task": task.describe(), "seeds": seeds, "budget": {"steps": config.steps,
               "batch_size": config.batch_size, "grad_accum": config.grad_accum,
               "processes": world_size(),
               "examples_seen": config.steps * config.batch_size * micro_batches_per_step(config.grad_accum),
               "n_train": len(task.train), "n_eval": len(task.eval), "sampler_steps": sampler_steps,
               "bf16": config.bf16},
               "lr_sweep": lr_sweep, "validation_fraction": validation_fraction if lr_sweep else None,
               "sweep_only": sweep_only, "rows": []}
    started = time.time()
    runner = _Runner(config, base, sampler_steps, progress, log)
    to_sweep = [spec for spec in specs if lr_sweep and spec.lr is None and spec.label not in learning_rates]
    if to_sweep:
        val_task = validation_split(task, validation_fraction)
        if jobs > 1:
            runner.in_parallel([(spec, seeds[0], candidate, _sweep_folder(out_dir, spec, candidate))
                                for spec in to_sweep for candidate in _candidates(spec, lr_sweep)], val_task, jobs)
    rows = []
    for spec in specs:
        row = {"label": spec.label, "method": spec.method, "options": spec.options,
               "config": method_config(spec.method, spec.options).to_dict()}
        if spec.train_settings:
            row["train_settings"] = spec.train_settings
        row["lr"] = spec.lr or _carried_lr(spec, learning_rates.get(spec.label)) or _default_lr(spec)
        if spec in to_sweep:
            row["sweep"] = _sweep(runner, spec, lr_sweep, val_task, seeds[0], out_dir)
            row["lr"] = max(row["sweep"], key=lambda s: (s["validation_score"],
                                                         s["validation_verbalizer_accuracy"] or 0))["lr"]
        if sweep_only:
            results["rows"].append(row)
            _write(results, out_dir, results_file)
        else:
            rows.append((spec, row))
    if jobs > 1:
        results["jobs"] = jobs
        runner.in_parallel([(spec, seed, row["lr"], seed_folder(out_dir, spec, seed))
                            for spec, row in rows for seed in seeds], task, jobs)
    for spec, row in rows:
        runs = [runner.run(spec, seed, row["lr"], task, seed_folder(out_dir, spec, seed)) for seed in seeds]
        row.update(_summarise(runs))
        if profile and is_main() and not spec.train_settings:  # a measurement of one process, of the
            # method alone (a profile knows no training settings: it would time another row's step)
            row["profile"] = _profile_row(spec, task, runs[0], config, base)
        results["rows"].append(row)
        _relative_to_full(results["rows"])
        results["wall_seconds"] = round(time.time() - started, 1)  # of this invocation (a resumed run: the rest)
        _write(results, out_dir, results_file)
    return results


def _check_request(specs: list[Spec], lr_sweep, sweep_only: bool, learning_rates: dict, jobs: int) -> None:
    """Refuse a bad comparison before hours of training."""
    if sweep_only and not lr_sweep:
        raise UserError("--sweep-only needs --lr-sweep")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {jobs}")
    if jobs > 1 and world_size() > 1:
        raise UserError("--jobs trains runs side by side on one machine; under accelerate launch or torchrun "
                        "every process already trains each run: leave --jobs at 1")
    missing = [s.label for s in specs if learning_rates and s.label not in learning_rates and s.lr is None]
    if missing and not lr_sweep:  # with a sweep, the rows without a given lr are swept
        raise UserError(f"no learning rate given for {', '.join(missing)} (or add --lr-sweep to sweep them)")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"two rows share a label: {labels}")
    for spec in specs:
        method_config(spec.method, spec.options)  # a bad option fails here
        if spec.lr is None and spec.label in learning_rates:
            _carried_lr(spec, learning_rates[spec.label])  # and a rate chosen for other options


def config_for(spec: Spec, config: TrainConfig) -> TrainConfig:
    """The comparison's training settings with the row's own over them."""
    return replace(config, **spec.train_settings)


def seed_folder(out_dir: Path, spec: Spec, seed: int) -> Path:
    """Where a comparison in `out_dir` keeps row `spec`'s run of `seed` (its results.json once done)."""
    return Path(out_dir) / _safe(spec.label) / f"seed-{seed}"


def _default_lr(spec: Spec) -> float:
    return method_config(spec.method, spec.options).default_lr()


def _candidates(spec: Spec, factors: list[float]) -> list[float]:
    """The learning rates a sweep tries: multiples of the method's default."""
    return [_default_lr(spec) * factor for factor in factors]


def _sweep_folder(out_dir: Path, spec: Spec, lr: float) -> Path:
    return out_dir / "sweep" / _safe(spec.label) / f"lr-{lr:g}"


def _sweep(runner: "_Runner", spec: Spec, factors: list[float], val_task: Task, seed: int, out_dir: Path) -> list[dict]:
    """Validation score of `spec` at each multiple of its default learning rate."""
    sweep = []
    for candidate in _candidates(spec, factors):
        r = runner.run(spec, seed, candidate, val_task, _sweep_folder(out_dir, spec, candidate))
        sweep.append({"lr": candidate, "validation_score": score(r),
                      "validation_verbalizer_accuracy": r.get("verbalizer_accuracy")})
    return sweep


class _Runner:
    """Trains one (spec, seed, lr) run into its folder, or reads back the results already there."""

    def __init__(self, config: TrainConfig, base, sampler_steps: int, progress: bool, log):
        self.config, self.base, self.sampler_steps, self.progress, self.log = config, base, sampler_steps, progress, log

    def finished(self, spec: Spec, seed: int, lr: float, task: Task, folder: Path) -> dict | None:
        """The run already in `folder`, if any; refused if it trained anything else (folders are
        named by label, and presets may share an --out folder)."""
        if not (folder / "results.json").is_file():
            return None
        result = read_json(folder / "results.json")
        trained = result.get("config") or {}
        config = config_for(spec, self.config)
        wanted = {"method": spec.method, "options": method_config(spec.method, spec.options).to_dict(),
                  "task": task.name, "n_train": len(task.train), "n_eval": len(task.eval), "seed": seed, "lr": lr,
                  "steps": config.steps, "batch_size": config.batch_size,
                  "grad_accum": config.grad_accum, "bf16": config.bf16,
                  "sampler_steps": self.sampler_steps, "cache_base": config.cache_base}
        found = {"method": result.get("method"), "task": result.get("task"), "n_train": result.get("n_train"),
                 "n_eval": result.get("n_eval"), "grad_accum": trained.get("grad_accum"),
                 "bf16": trained.get("bf16"), "sampler_steps": result.get("steps"),
                 "seed": trained.get("seed"), "lr": trained.get("lr"), "steps": trained.get("steps"),
                 "batch_size": trained.get("batch_size"), "cache_base": trained.get("cache_base"),
                 "options": _resolved(result.get("method"), result.get("options"))}
        differ = [k for k in wanted if found[k] is not None and found[k] != wanted[k]]
        if differ:
            key, had, asked = differ[0], found[differ[0]], wanted[differ[0]]
            if key == "options":  # name the option
                key = next(k for k in sorted(had.keys() | asked.keys()) if had.get(k) != asked.get(k))
                had, asked = had.get(key), asked.get(key)
            raise UserError(f"{folder} holds a run with {key}={had!r}, not {asked!r} as row {quoted(spec.label)} "
                            "asks: use another --out")
        return result

    def run(self, spec: Spec, seed: int, lr: float, task: Task, folder: Path) -> dict:
        done = self.finished(spec, seed, lr, task, folder)
        if done is not None:
            return done
        result, seconds = _train_one(spec, seed, lr, task, folder, self.config, self.base, self.sampler_steps,
                                     self.progress)
        self.log(f"{spec.label} seed {seed} lr {lr:g}: score {score(result):.4f} ({seconds:.0f}s)")
        return result

    def in_parallel(self, runs: list, task: Task, jobs: int) -> None:
        """Train (spec, seed, lr, folder) runs on `task`, `jobs` at a time, each in its own process.

        On a few CPU cores, small models use two threads poorly: two single-threaded runs side
        by side finish sooner than one after the other. Each run writes its results.json as
        usual, so the sequential pass that follows only reads them back (and a crash loses
        only the runs in flight).
        """
        todo = [run for run in runs if self.finished(*run[:3], task, run[3]) is None]
        if not todo:
            return
        threads = max(1, torch.get_num_threads() // jobs)
        self.log(f"{len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, spec, seed, lr, task, folder, self.config, self.base,
                                   self.sampler_steps, False, threads): (spec, seed, lr)
                       for spec, seed, lr, folder in todo}
            for future in as_completed(futures):
                spec, seed, lr = futures[future]
                result, seconds = future.result()  # a failed run stops the comparison (finished ones are kept)
                self.log(f"{spec.label} seed {seed} lr {lr:g}: score {score(result):.4f} ({seconds:.0f}s)")


def _resolved(method, options) -> dict | None:
    """Stored options (a run's, or a row's of a file older than rows' "config") with the
    defaults they trained under (MethodConfig.from_stored); None if this version cannot read them."""
    if not isinstance(method, str) or not isinstance(options, dict):
        return None
    try:
        return stored_config(method, options).to_dict()
    except UserError:
        return None


def _train_one(spec: Spec, seed: int, lr: float, task: Task, folder: Path, config: TrainConfig, base,
               sampler_steps: int, progress: bool = False, threads: int | None = None) -> tuple[dict, float]:
    """One row's run for one seed, from a fresh copy of the base: (its result, seconds)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = replace(config_for(spec, config), seed=seed, lr=lr)
    began = time.time()
    result = fine_tune(load_backbone(base), task, make_method(spec.method, spec.options), cfg,
                       out_dir=folder, sampler_steps=sampler_steps, progress=progress)
    result.pop("model")
    return result, time.time() - began


def _write(results: dict, out_dir: Path, results_file=None) -> None:
    """results.json + results.md in the run folder (and at `results_file`), each written atomically
    (by the main process of a run launched on several)."""
    if not is_main():
        return
    for path in [out_dir / "results.json"] + ([Path(results_file)] if results_file else []):
        write_json(path, results)
        write_text(path.with_suffix(".md"), markdown(results) + "\n")


def _summarise(runs: list[dict]) -> dict:
    first = runs[0]
    out = {"seeds": [r["seed"] for r in runs]}
    out.update(over_seeds(runs))
    out["final_train_loss"] = mean_std([r["train"]["final_train_loss"] for r in runs])
    out["sec_per_step"] = sorted(r["train"]["sec_per_step"] for r in runs)[len(runs) // 2]
    out["device"] = first["train"]["device"]
    for key in ("trainable_parameters", "base_parameters", "percent_of_base", "adapter_bytes"):
        out[key] = first[key]
    for key in ("formula", "formula_total", "terms", "inference_parameters"):
        if key in first:
            out[key] = first[key]
    return out


def _profile_row(spec: Spec, task: Task, first_run: dict, config, base) -> dict:
    """Peak training memory (and a clean step time) on a batch shaped like the task's."""
    backbone = load_backbone(base)
    enc = encode(backbone.tokenizer, task.train[:256], first_run["response_length"], backbone.max_length,
                 truncate=True)
    prompt = round(sum(map(len, enc.prompts)) / len(enc.prompts))
    return profile_training(spec.method, spec.options, base=str(base or SHIPPED_BASE),
                            batch_size=config.batch_size, prompt_length=prompt,
                            response_length=first_run["response_length"], steps=5, warmup=2,
                            bf16=config.bf16, device=config.device, tf32=config.tf32, compile=config.compile)


def _relative_to_full(rows: list[dict]) -> None:
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return
    key = metric_of(full)
    for row in rows:
        row["percent_of_full"] = 100.0 * row[key]["mean"] / full[key]["mean"] if full[key]["mean"] else None


def sweep_markdown(results: dict) -> str:
    """The learning-rate sweep: validation score per lr, the chosen one in bold."""
    lines = ["| method | " + " | ".join(f"lr × {f:g}" for f in results["lr_sweep"]) + " | chosen lr |",
             "|---|" + "---|" * (len(results["lr_sweep"]) + 1)]
    for row in results["rows"]:
        cells = [(f"**{100 * s['validation_score']:.1f}** ({s['lr']:g})" if s["lr"] == row["lr"]
                  else f"{100 * s['validation_score']:.1f} ({s['lr']:g})") for s in row.get("sweep", [])]
        if "sweep" not in row:  # its lr came from an earlier sweep (--lr-from)
            cells = ["(given)"] * len(results["lr_sweep"])
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['lr']:g} |")
    return "\n".join(lines)


def _spread(value: dict) -> str:
    """mean ± std over seeds, or the value of a single run."""
    if value.get("n", 2) < 2:
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def markdown(results: dict) -> str:
    """The comparison as a markdown table (what the README shows)."""
    if results.get("sweep_only"):
        return sweep_markdown(results)
    b = results["budget"]
    task = results["task"]
    classification = task["kind"] == "classification"
    head = ("| method | gen. acc. % | verbalizer acc. % |" if classification else "| method | ROUGE-L % | token F1 % |")
    head += (" % of full FT | trainable params | % of base | adapter bytes | lr | s/step (train) "
             "| peak train mem. (MB) | final train loss |")
    lines = [f"Task `{task['task']}`: {b['n_train']} training examples, {b['steps']} steps × batch "
             f"{b['examples_seen'] // b['steps']} ({b['examples_seen']} examples seen"
             f"{', over ' + str(b['processes']) + ' processes' if b.get('processes', 1) > 1 else ''}), held-out "
             f"{b['n_eval']} examples, "
             + (f"seeds {', '.join(map(str, results['seeds']))} (mean ± sample std)." if len(results["seeds"]) > 1
                else f"seed {results['seeds'][0]} (one run per row).")
             + (f" Trained {results['jobs']} runs at a time, so s/step is per run under that load."
                if results.get("jobs", 1) > 1 else ""),
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for row in results["rows"]:
        metrics = (f"{percent(row.get('accuracy'))} | {percent(row.get('verbalizer_accuracy'))}" if classification
                   else f"{percent(row.get('rouge_l'))} | {percent(row.get('token_f1'))}")
        full = f"{row['percent_of_full']:.1f}" if row.get("percent_of_full") is not None else ""
        memory = row.get("profile", {}).get("peak_memory_bytes")
        lines.append(f"| {row['label']} | {metrics} | {full} | {row['trainable_parameters']:,} "
                     f"| {row['percent_of_base']:.2f} | {row['adapter_bytes']:,} | {row['lr']:g} "
                     f"| {row['sec_per_step']:.3f} | {'' if memory is None else f'{memory / 2**20:.0f}'} "
                     f"| {_spread(row['final_train_loss'])} |")
    return "\n".join(lines)
