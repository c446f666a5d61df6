"""Train: pick a task and a method (its option controls come from the method's config), watch the
loss and the held-out score, stop; download, upload and delete adapters, or reset the workspace."""

from __future__ import annotations

import re
import time

import gradio as gr

from lora_diffusion.bounds import MAX_SEED
from lora_diffusion.data import SUITE_TASKS, load_task
from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS, OptionSpec, describe, option_specs, option_text
from lora_diffusion.metrics import metric_of, primary_metric, score
from lora_diffusion.plots import training_figure
from lora_diffusion.training import TrainConfig
from lora_diffusion.workspace import LOADABLE_TASKS

from . import explain
from .common import (TABLE_HEADERS, Context, figure_download, handler, number, readable_errors, short_text, uploaded,
                     user_workspace, whole)
from .explain import knob

CSV_TASK = "uploaded CSV"
TASKS = list(LOADABLE_TASKS) + [CSV_TASK]  # never a hub dataset: the workbench runs offline
MAX_CSV_BYTES = 20 * 2**20  # an uploaded CSV, checked before it is read
MAX_CSV_ROWS = 20_000       # rows of it at most
CSV_HELD_OUT = 200          # rows of it held out (and scored at the end of a run) at most
# The tab's default run (what its controls start at): the app's demo, and the Lesson tab's step 1.
DEFAULT_RUN = dict(task_name="suite_sentiment", max_train=0, method="lora_diffusion", lr=0, steps=200, batch_size=16,
                   seed=0)
# Every option control of every method, in the order the Train button passes them.
OPTION_LAYOUT: list[tuple[str, OptionSpec]] = [(m, spec) for m in METHODS for spec in option_specs(m)]


def _control_value(spec: OptionSpec):
    """The default a control starts at: the value itself, or text for a tuple ("" for none)."""
    if spec.default is None:
        return ""
    return option_text(spec.default) if spec.kind is tuple else spec.default


def option_control(spec: OptionSpec):
    """The control for one method option: its default, its help as the tooltip, its bounds."""
    label, info = spec.name, describe(spec)
    if spec.kind is bool:
        return gr.Checkbox(spec.default, label=label, info=info)
    if spec.choices is not None:
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label, info=info)
    if spec.kind in (int, float) and not spec.optional:
        return gr.Number(spec.default, label=label, info=info, precision=0 if spec.kind is int else None,
                         minimum=spec.min, maximum=spec.max)
    return gr.Textbox(_control_value(spec), label=label, info=info, placeholder="none")  # tuples, optional values


def collect_options(method: str, *values) -> dict:
    """The chosen method's options from the values of all option controls (in OPTION_LAYOUT order)."""
    return {spec.name: value for (m, spec), value in zip(OPTION_LAYOUT, values) if m == method}


def show_options(method: str) -> list:
    """Only the chosen method's option group is visible."""
    return [gr.update(visible=m == method) for m in METHODS]


def show_csv(task_name: str):
    """The CSV upload and its columns are visible only for the task that trains on them."""
    return gr.update(visible=task_name == CSV_TASK)


def csv_task_name(name: str) -> str:
    """What an uploaded CSV's task is called: its file's name, unless the workbench would take that for a
    task it loads itself or for a hub dataset (its adapter would be scored on, or refused for, that)."""
    if name in LOADABLE_TASKS or name.startswith("hub:") or "/" in name or "\\" in name:
        return "csv_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return name


def _task(ctx: Context, task_name, csv_file, text_column, label_column, max_train, seed):
    max_train = whole(max_train, "max train examples", 0, 10**7)
    if task_name == CSV_TASK:
        if csv_file is None:
            raise UserError("upload a CSV file first (a text column and a label column)")
        path = uploaded(ctx, csv_file)
        if path.stat().st_size > MAX_CSV_BYTES:  # rows are counted as they are read; bytes before
            raise UserError(f"the CSV is larger than {MAX_CSV_BYTES // 2**20} MB; upload at most "
                            f"{MAX_CSV_ROWS:,} rows")
        task = load_task("csv", train_file=path, text_column=short_text(text_column, "the text column") or "text",
                         label_column=short_text(label_column, "the label column") or "label",
                         max_train=max_train or None, max_rows=MAX_CSV_ROWS, max_heldout=CSV_HELD_OUT, seed=seed)
        task.name = csv_task_name(task.name)
        return task
    if task_name not in TASKS:  # the API could name any task, a hub download included
        raise UserError(f"choose a task from the list: {', '.join(TASKS)}")
    return load_task(task_name, data_dir=ctx.data_dir, max_train=max_train or None,
                     max_eval=200 if task_name not in SUITE_TASKS else None, seed=seed)


def _final_metric(result: dict) -> str:
    if primary_metric(result["kind"]) == "accuracy":
        return (f"held-out accuracy **{100 * result['accuracy']:.1f}%** (generative), "
                f"{100 * result['verbalizer_accuracy']:.1f}% (verbalizer) on {result['n_eval']} examples")
    return (f"held-out ROUGE-L **{100 * result['rouge_l']:.1f}**, token F1 {100 * result['token_f1']:.1f} "
            f"on {result['n_eval']} examples")


def _monitor_text(job) -> str:
    points = job.monitor()
    if not points:
        return "held-out score: after the first evaluation"
    last = {k.removeprefix("eval_monitor_"): v for k, v in points[-1].items()}
    return (f"held-out {metric_of(last)} at step {last['step']}: **{100 * score(last):.1f}%** "
            "(monitor subset)")


def _title(job) -> str:
    spec = job.spec
    return f"{spec['method']} on {spec['task']} ({spec['n_train']} train / {spec['n_eval']} held-out)"


def _status(job) -> str:
    """The job's status line: its place in the queue, its step, or how it ended; then its id (the adapter's name)."""
    if job.status == "queued":
        state = f"**queued** ({f'number {job.position} in the queue' if job.position else 'starting'})"
    elif not job.finished:
        state = f"**{job.status}**: step {job.step} / {job.spec['steps']}"
    elif job.result is None:
        state = f"**{job.status}**"
    else:
        state = f"**{job.status}** after {job.result['train']['steps']} steps"
    return f"{state} · {_title(job)} · `{job.id}`"


def _final_text(job) -> str:
    """The held-out score of an ended job, or why it has none (it was stopped)."""
    if job.result is None or job.stopped:
        return job.note or ""
    return _final_metric(job.result)


def _follow(job, progress):
    """(job id, status, loss figure, score) of `job` every second until it ends; a failure is one line.

    The figure and the score are sent again only when the run has logged something new: a plot
    redrawn every second costs the browser CPU that the training, on the same laptop, needs.
    """
    steps, title = job.spec["steps"], _title(job)
    shown = len(job.records)
    yield job.id, _status(job), training_figure(list(job.records), title), _monitor_text(job)
    while not job.finished:
        time.sleep(1.0)
        progress((job.step, steps), desc=f"{job.status}: step {job.step}/{steps}")
        if len(job.records) == shown:
            yield job.id, _status(job), gr.skip(), gr.skip()
            continue
        shown = len(job.records)
        yield job.id, _status(job), training_figure(list(job.records), title), _monitor_text(job)
    if job.status == "failed":
        raise UserError(job.error)
    yield job.id, _status(job), training_figure(list(job.records), title), _final_text(job)


def _options(options) -> dict:
    if options is not None and not isinstance(options, dict):
        raise UserError("the options must be a JSON object of option: value")
    return options or {}


@readable_errors
def train(ctx: Context, user, task_name, csv_file, text_column, label_column, max_train, method, options, lr, steps,
          batch_size, seed, progress=gr.Progress()):
    """Start a training job and stream (job id, status, loss figure, score) until it ends."""
    ws = user_workspace(ctx, user)
    seed, steps = whole(seed, "the seed", 0, MAX_SEED), whole(steps, "steps", 1, ws.limits.steps)
    config = TrainConfig(steps=steps, batch_size=whole(batch_size, "the batch size", 1, ws.limits.batch_size),
                         lr=number(lr, "the learning rate", 0, 1) or None, seed=seed,
                         log_every=max(1, min(10, steps // 20)), eval_every=max(10, steps // 4),
                         checkpoint_every=max(50, steps // 4))
    task = _task(ctx, task_name, csv_file, text_column, label_column, max_train, seed)  # after the cheap checks
    job = ws.start_training(task, method, _options(options), config, base=ctx.base, sampler_steps=8)
    yield from _follow(job, progress)


@readable_errors
def follow(ctx: Context, user, progress=gr.Progress()):
    """A page opens: it follows the user's job still queued or running, if any (a reload loses nothing)."""
    jobs = [j for j in user_workspace(ctx, user).jobs.values() if not j.finished]
    if not jobs:
        yield gr.skip()
        return
    yield from _follow(jobs[-1], progress)


STOPPING = {"queued": "stopped: the job leaves the queue without training",
            "running": "stopping after the current step; the adapter is kept but not scored",
            "evaluating": "stopping: the final evaluation is cut short and the adapter is not kept"}


@readable_errors
def stop(ctx: Context, user, job_id):
    """Stop one of the caller's own jobs, at whatever stage it is."""
    if not job_id:
        return "nothing is training"
    job = user_workspace(ctx, user).job(job_id)
    if job.finished:
        return f"the job has already ended ({job.status})"
    stage = job.status
    job.stop()
    return STOPPING.get(stage, "stopping…")


@readable_errors
def download(ctx: Context, user, name):
    if not name:
        raise UserError("pick an adapter to download")
    return str(user_workspace(ctx, user).export_adapter(name))


@readable_errors
def upload(ctx: Context, user, files):
    if not files:
        raise UserError("choose the adapter zip (or adapter.safetensors + adapter_config.json)")
    paths = [uploaded(ctx, f) for f in (files if isinstance(files, list) else [files])]
    name = user_workspace(ctx, user).import_adapter(paths, base=ctx.base)
    return f"imported as **{name}**"


@readable_errors
def delete(ctx: Context, user, name):
    """Delete one of the caller's own adapters (its whole run); the picker is emptied."""
    if not name:
        raise UserError("pick an adapter to delete")
    user_workspace(ctx, user).delete_adapter(name)
    return f"deleted **{name}**", None


RESET_LABEL = "yes, delete everything of mine"


@readable_errors
def reset(ctx: Context, user, confirmed):
    """Delete all of the caller's runs and adapters, once `confirmed` (the box is unticked again)."""
    if confirmed is not True:
        raise UserError(f"tick '{RESET_LABEL}' first: this deletes all your adapters and runs")
    removed = user_workspace(ctx, user).reset()
    return f"deleted all your runs and adapters ({removed})", False


def limits_text(ctx: Context) -> str:
    limits = ctx.workspace.limits
    minutes = f", {limits.seconds / 60:g} minutes of training" if limits.seconds else ""
    return (f"Per job: up to {limits.steps:,} steps, a batch of {limits.batch_size}{minutes}; "
            f"{limits.jobs_per_user} jobs per user at once, first come first served. An uploaded CSV: up to "
            f"{MAX_CSV_BYTES // 2**20} MB and {MAX_CSV_ROWS:,} rows, of which {CSV_HELD_OUT} at most are held out. "
            "**Stop** takes a queued job out of the queue; a running one ends at the next step and keeps its "
            "adapter, not scored (listed as *stopped at step N*); during the final evaluation it ends at once "
            "and the adapter is not kept.")


def tab(ctx: Context, user) -> dict:
    """Lay out the Train tab and wire it; returns the lists other tabs refresh and the events that change them."""
    explain.accordion(explain.TRAIN_TAB)
    with gr.Row():
        with gr.Column():
            task_in = gr.Dropdown(TASKS, value=DEFAULT_RUN["task_name"], **knob("Train", "task"))
            with gr.Group(visible=False) as csv_group:  # shown for "uploaded CSV" only (show_csv)
                csv_in = gr.File(label="CSV to train on (a text column and a label column)", file_types=[".csv"],
                                 type="filepath")
                with gr.Row():
                    text_col = gr.Textbox("text", **knob("Train", "text column"))
                    label_col = gr.Textbox("label", **knob("Train", "label column"))
            max_train = gr.Number(DEFAULT_RUN["max_train"], precision=0,
                                  **knob("Train", "max train examples (0 = all)"))
        with gr.Column():
            method_in = gr.Dropdown(list(METHODS), value=DEFAULT_RUN["method"], elem_id="train-method",
                                    **knob("Train", "method"))
            controls, groups = [], []
            for m in METHODS:
                with gr.Group(visible=m == DEFAULT_RUN["method"]) as group:
                    gr.Markdown(f"options of `{m}`" if option_specs(m) else f"`{m}` has no options")
                    controls += [option_control(spec) for spec in option_specs(m)]
                groups.append(group)
            options_json = gr.JSON(visible=False)
        with gr.Column():
            lr_in = gr.Number(DEFAULT_RUN["lr"], **knob("Train", "learning rate (0 = the method's default)"))
            steps_in = gr.Number(DEFAULT_RUN["steps"], precision=0, **knob("Train", "steps"))
            batch_in = gr.Number(DEFAULT_RUN["batch_size"], precision=0, **knob("Train", "batch size"))
            seed_in = gr.Number(DEFAULT_RUN["seed"], precision=0, **knob("Train", "seed"))
            with gr.Row():
                start_btn = gr.Button("Train", variant="primary")
                stop_btn = gr.Button("Stop")
    gr.Markdown(limits_text(ctx))
    job_id = gr.State("")
    status = gr.Markdown("", elem_id="train-status")
    with gr.Row():
        loss_plot = gr.Plot(label="loss and held-out score", elem_id="loss-plot")
        with gr.Column():
            metric = gr.Markdown("", elem_id="train-metric")
            explain.accordion(explain.LOSS_PLOT)
    figure_download(ctx, user, {"loss": loss_plot}, "download_figures_train")
    gr.Markdown("### Your adapters")
    table = gr.Dataframe([], headers=TABLE_HEADERS, interactive=False, elem_id="adapters-table")
    broken = gr.Markdown("")
    with gr.Row():
        pick = gr.Dropdown([], allow_custom_value=True, elem_id="train-pick", **knob("Train", "adapter"))
        download_btn = gr.Button("Prepare download")
        delete_btn = gr.Button("Delete", variant="stop")
        download_file = gr.File(label="adapter zip")
    with gr.Row():
        upload_files = gr.File(label="upload an adapter (zip, or its .safetensors + .json)",
                               file_types=[".zip", ".safetensors", ".json"], file_count="multiple", type="filepath")
        upload_btn = gr.Button("Import")
    with gr.Row():
        confirm = gr.Checkbox(False, elem_id="reset-confirm", **knob("Train", RESET_LABEL))
        reset_btn = gr.Button("Delete all my adapters and runs", variant="stop")
    adapters_msg = gr.Markdown("", elem_id="adapters-message")

    method_in.change(show_options, method_in, groups, api_visibility="undocumented")
    task_in.change(show_csv, task_in, csv_group, api_visibility="undocumented")
    trained = start_btn.click(collect_options, [method_in] + controls, options_json,
                              api_visibility="undocumented").then(
        handler(train, ctx), [user, task_in, csv_in, text_col, label_col, max_train, method_in, options_json, lr_in,
                              steps_in, batch_in, seed_in],
        [job_id, status, loss_plot, metric], api_name="train", concurrency_limit=None)  # the workspace queues
    stop_btn.click(handler(stop, ctx), [user, job_id], status, api_name="stop", concurrency_limit=None)
    download_btn.click(handler(download, ctx), [user, pick], download_file, api_name="download")
    uploaded = upload_btn.click(handler(upload, ctx), [user, upload_files], adapters_msg, api_name="upload")
    deleted = delete_btn.click(handler(delete, ctx), [user, pick], [adapters_msg, pick], api_name="delete")
    emptied = reset_btn.click(handler(reset, ctx), [user, confirm], [adapters_msg, confirm], api_name="reset")
    return {"pick": pick, "table": table, "broken": broken, "changed": [trained, uploaded, deleted, emptied],
            "job": [job_id, status, loss_plot, metric]}
