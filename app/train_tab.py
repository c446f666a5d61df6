"""Train: pick a task and a method (its option controls come from the method's config), watch the
loss and the held-out score, stop, download and upload adapters."""

from __future__ import annotations

import time

import gradio as gr

from lora_diffusion.data import SUITE_TASKS, load_task
from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS, OptionSpec, describe, option_specs, option_text
from lora_diffusion.metrics import metric_of, primary_metric, score
from lora_diffusion.plots import training_figure
from lora_diffusion.training import TrainConfig

from .common import TABLE_HEADERS, Context, adapter_names, adapter_table, handler, readable_errors

TASKS = list(SUITE_TASKS) + ["sst2", "agnews", "agnews_title", "uploaded CSV"]
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


def _task(ctx: Context, task_name, csv_file, text_column, label_column, max_train, seed):
    if task_name == "uploaded CSV":
        if csv_file is None:
            raise UserError("upload a CSV file first (a text column and a label column)")
        return load_task("csv", train_file=csv_file, text_column=text_column or "text",
                         label_column=label_column or "label", max_train=int(max_train) or None, seed=int(seed))
    return load_task(task_name, data_dir=ctx.data_dir, max_train=int(max_train) or None,
                     max_eval=200 if task_name not in SUITE_TASKS else None, seed=int(seed))


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


@readable_errors
def train(ctx: Context, task_name, csv_file, text_column, label_column, max_train, method, options, lr, steps,
          batch_size, seed, progress=gr.Progress()):
    """Start a training job and stream (job id, status, loss figure, score, adapter table) until it ends."""
    task = _task(ctx, task_name, csv_file, text_column, label_column, max_train, seed)
    steps = int(steps)
    if not 1 <= steps <= 20000:
        raise UserError("steps must be between 1 and 20000")
    config = TrainConfig(steps=steps, batch_size=int(batch_size), lr=float(lr) or None, seed=int(seed),
                         log_every=max(1, min(10, steps // 20)), eval_every=max(10, steps // 4),
                         checkpoint_every=max(50, steps // 4))
    job = ctx.workspace.start_training(task, method, options or {}, config, base=ctx.base, sampler_steps=8)
    title = f"{method} on {task.name} ({len(task.train)} train / {len(task.eval)} held-out)"
    yield job.id, f"**{job.status}** … {title}", training_figure([], title), "", gr.update()
    while not job.finished:
        time.sleep(1.0)
        progress((job.step, steps), desc=f"{job.status}: step {job.step}/{steps}")
        yield (job.id, f"**{job.status}**: step {job.step} / {steps} · {title}",
               training_figure(list(job.records), title), _monitor_text(job), gr.update())
    if job.status == "failed":
        raise UserError(job.error)
    yield (job.id, f"**{job.status}** after {job.result['train']['steps']} steps · {title}",
           training_figure(list(job.records), title), _final_metric(job.result),
           gr.update(value=adapter_table(ctx)))


@readable_errors
def stop(ctx: Context, job_id):
    if job_id and job_id in ctx.workspace.jobs:
        ctx.workspace.jobs[job_id].stop()
        return "stopping after the current step…"
    return "nothing is training"


@readable_errors
def download(ctx: Context, name):
    if not name:
        raise UserError("pick an adapter to download")
    return str(ctx.workspace.export_adapter(name))


@readable_errors
def upload(ctx: Context, files):
    if not files:
        raise UserError("choose the adapter zip (or adapter.safetensors + adapter_config.json)")
    paths = [f if isinstance(f, str) else f.name for f in (files if isinstance(files, list) else [files])]
    name = ctx.workspace.import_adapter(paths)
    return f"imported as **{name}**", adapter_table(ctx), gr.update(choices=adapter_names(ctx))


def tab(ctx: Context) -> dict:
    """Lay out the Train tab and wire it; returns the components other tabs refresh."""
    with gr.Row():
        with gr.Column():
            task_in = gr.Dropdown(TASKS, value="suite_sentiment", label="task")
            csv_in = gr.File(label="CSV to train on (for 'uploaded CSV')", file_types=[".csv"], type="filepath")
            with gr.Row():
                text_col = gr.Textbox("text", label="text column")
                label_col = gr.Textbox("label", label="label column")
            max_train = gr.Number(0, label="max train examples (0 = all)", precision=0)
        with gr.Column():
            method_in = gr.Dropdown(list(METHODS), value="lora_diffusion", label="method")
            controls, groups = [], []
            for m in METHODS:
                with gr.Group(visible=m == "lora_diffusion") as group:
                    gr.Markdown(f"options of `{m}`" if option_specs(m) else f"`{m}` has no options")
                    controls += [option_control(spec) for spec in option_specs(m)]
                groups.append(group)
            options_json = gr.JSON(visible=False)
        with gr.Column():
            lr_in = gr.Number(0, label="learning rate (0 = the method's default)")
            steps_in = gr.Number(200, label="steps", precision=0)
            batch_in = gr.Number(16, label="batch size", precision=0)
            seed_in = gr.Number(0, label="seed", precision=0)
            with gr.Row():
                start_btn = gr.Button("Train", variant="primary")
                stop_btn = gr.Button("Stop")
    job_id = gr.State("")
    status = gr.Markdown("", elem_id="train-status")
    with gr.Row():
        loss_plot = gr.Plot(label="loss and held-out score", elem_id="loss-plot")
        metric = gr.Markdown("", elem_id="train-metric")
    gr.Markdown("### Adapters in this workspace")
    adapters = gr.Dataframe(adapter_table(ctx), headers=TABLE_HEADERS, interactive=False)
    with gr.Row():
        pick = gr.Dropdown(adapter_names(ctx), label="adapter", allow_custom_value=True)
        download_btn = gr.Button("Prepare download")
        download_file = gr.File(label="adapter zip")
    with gr.Row():
        upload_files = gr.File(label="upload an adapter (zip, or its .safetensors + .json)",
                               file_types=[".zip", ".safetensors", ".json"], file_count="multiple", type="filepath")
        upload_btn = gr.Button("Import")
        upload_msg = gr.Markdown("")

    method_in.change(show_options, method_in, groups, api_visibility="undocumented")
    start_btn.click(collect_options, [method_in] + controls, options_json, api_visibility="undocumented").then(
        handler(train, ctx), [task_in, csv_in, text_col, label_col, max_train, method_in, options_json, lr_in,
                              steps_in, batch_in, seed_in],
        [job_id, status, loss_plot, metric, adapters], api_name="train", concurrency_limit=4)
    stop_btn.click(handler(stop, ctx), job_id, status, api_name="stop", concurrency_limit=None)
    download_btn.click(handler(download, ctx), pick, download_file, api_name="download")
    upload_btn.click(handler(upload, ctx), upload_files, [upload_msg, adapters, pick], api_name="upload")
    return {"pick": pick}
