"""The lora-diffusion workbench: a Gradio app over the library (no ML logic lives here).

    python app/main.py [--port 7860] [--workspace runs/app]     (or: lora-diffusion app)

Tabs: Train (fine-tune with a live loss curve, stop, download / upload adapters),
Generate (watch the response unmask step by step: base vs adapter vs router-composed),
Analyse (effective rank per step, trajectory t-SNE, router weights, forgetting), Compare
(a `lora-diffusion compare` results file as table and chart; the rank-scaling plots).
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings to the network
import gradio as gr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_diffusion.compare import comparison_figure, markdown as compare_markdown  # noqa: E402
from lora_diffusion.data import DEFAULT_DATA, SUITE, load_task  # noqa: E402
from lora_diffusion.errors import UserError  # noqa: E402
from lora_diffusion.io import read_json  # noqa: E402
from lora_diffusion.methods import METHODS  # noqa: E402
from lora_diffusion.train import TrainConfig  # noqa: E402
from lora_diffusion import workbench  # noqa: E402

TASKS = list(SUITE) + ["sst2", "agnews", "agnews_title", "uploaded CSV"]
BASE_ONLY = "(base model, no adapter)"


def readable_errors(fn):
    """Show every failure as a one-line message in the page, never a traceback."""
    def message(e: Exception) -> str:
        return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"

    if hasattr(fn, "__code__") and fn.__code__.co_flags & 0x20:  # a generator: stream its updates
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise gr.Error(message(e)) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(message(e)) from None
    return wrapper


def _results_path(path) -> Path:
    """A results file as typed: relative to where the app runs, else to the checkout (results/...)."""
    path = Path(path if isinstance(path, str) else path.name)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path


def method_options(method, ranks, k, lambda_rank, lambda_orth, r) -> dict:
    if method == "lora_diffusion":
        try:
            rank_list = [int(x) for x in str(ranks).replace(" ", "").split(",")]
        except ValueError:
            raise UserError(f"ranks per phase must be three integers like 64,32,8, not {ranks!r}") from None
        if len(rank_list) != 3 or min(rank_list) < 1:
            raise UserError(f"ranks per phase must be three positive integers like 64,32,8, not {ranks!r}")
        return {"ranks": rank_list, "k": int(k), "lambda_rank": float(lambda_rank), "lambda_orth": float(lambda_orth)}
    if method in ("lora", "dora"):
        return {"r": int(r)}
    return {}


def build(workspace: workbench.Workspace, data_dir: str | None = None) -> gr.Blocks:
    def adapter_choices() -> list[str]:
        return [a["name"] for a in workspace.adapters()]

    def adapter_table() -> list[list]:
        return [[a["name"], a["method"], a["task"],
                 "" if a["accuracy"] is None else f"{100 * a['accuracy']:.1f}",
                 f"{a['trainable_parameters']:,}"] for a in workspace.adapters()]

    # ---- Train ---------------------------------------------------------------------------

    @readable_errors
    def train(task_name, csv_file, text_column, label_column, max_train, method, ranks, k, lambda_rank,
              lambda_orth, r, lr, steps, batch_size, seed, progress=gr.Progress()):
        if task_name == "uploaded CSV":
            if csv_file is None:
                raise UserError("upload a CSV file first (a text column and a label column)")
            task = load_task("csv", train_file=csv_file, text_column=text_column or "text",
                             label_column=label_column or "label", max_train=int(max_train) or None, seed=int(seed))
        else:
            task = load_task(task_name, data_dir=data_dir, max_train=int(max_train) or None,
                             max_eval=200 if task_name not in SUITE else None, seed=int(seed))
        steps = int(steps)
        if not 1 <= steps <= 20000:
            raise UserError("steps must be between 1 and 20000")
        config = TrainConfig(steps=steps, batch_size=int(batch_size), lr=float(lr) or None, seed=int(seed),
                             log_every=max(1, min(10, steps // 20)), eval_every=max(10, steps // 4),
                             checkpoint_every=max(50, steps // 4))
        job = workspace.start_training(task, method, method_options(method, ranks, k, lambda_rank, lambda_orth, r),
                                       config, sampler_steps=8)
        title = f"{method} on {task.name} ({len(task.train)} train / {len(task.eval)} held-out)"
        yield job.id, f"**{job.status}** … {title}", workbench.training_figure([], title), "", gr.update()
        while not job.finished:
            time.sleep(1.0)
            progress((job.step, steps), desc=f"{job.status}: step {job.step}/{steps}")
            yield (job.id, f"**{job.status}**: step {job.step} / {steps} · {title}",
                   workbench.training_figure(list(job.records), title), _monitor_text(job), gr.update())
        if job.status == "failed":
            raise UserError(job.error)
        result = job.result
        metric = (f"held-out accuracy **{100 * result['accuracy']:.1f}%** (generative), "
                  f"{100 * result['verbalizer_accuracy']:.1f}% (verbalizer) on {result['n_eval']} examples"
                  if "accuracy" in result else
                  f"held-out ROUGE-L **{100 * result['rouge_l']:.1f}**, token F1 {100 * result['token_f1']:.1f} "
                  f"on {result['n_eval']} examples")
        yield (job.id, f"**{job.status}** after {result['train']['steps']} steps · {title}",
               workbench.training_figure(list(job.records), title), metric, gr.update(value=adapter_table()))

    def _monitor_text(job) -> str:
        points = job.monitor()
        if not points:
            return "held-out score: after the first evaluation"
        last = points[-1]
        key = "eval_monitor_accuracy" if "eval_monitor_accuracy" in last else "eval_monitor_rouge_l"
        return f"held-out {key.split('_')[-1]} at step {last['step']}: **{100 * last[key]:.1f}%** (monitor subset)"

    @readable_errors
    def stop(job_id):
        if job_id and job_id in workspace.jobs:
            workspace.jobs[job_id].stop()
            return "stopping after the current step…"
        return "nothing is training"

    @readable_errors
    def download(name):
        if not name:
            raise UserError("pick an adapter to download")
        return str(workspace.export_adapter(name))

    @readable_errors
    def upload(files):
        if not files:
            raise UserError("choose the adapter zip (or adapter.safetensors + adapter_config.json)")
        paths = [f if isinstance(f, str) else f.name for f in (files if isinstance(files, list) else [files])]
        name = workspace.import_adapter(paths)
        return f"imported as **{name}**", adapter_table(), gr.update(choices=adapter_choices())

    # ---- Generate ------------------------------------------------------------------------

    def trajectory_html(label: str, report: dict) -> str:
        colours = {"masked": "#d0d0d0", "new": "#ffb347", "settled": "#8fd18f"}
        rows = []
        for i, s in enumerate(report["steps"]):
            cells = "".join(f'<span style="background:{colours[st]};padding:1px 4px;margin:1px;border-radius:3px;'
                            f'font-family:monospace">{html.escape(tok)}</span>'
                            for tok, st in zip(s["tokens"], s["state"]))
            norm = "" if s["perturbation_norm"] is None else f" ‖δ‖={s['perturbation_norm']:.2f}"
            rows.append(f"<div>step {i + 1} (t={s['t']:.2f}{norm}): {cells}</div>")
        return (f"<h4>{html.escape(label)}: “{html.escape(report['answer'])}”</h4>"
                + "".join(rows))

    @readable_errors
    def generate(adapter_name, composed, instruction, text, length, steps, temperature, seed):
        decode = lambda model: workbench.denoising_trajectory(model, instruction, text, int(length), int(steps),
                                                              float(temperature), int(seed))
        reports = {"base": decode(workbench.load_model()[0])}
        if adapter_name and adapter_name != BASE_ONLY:
            reports[adapter_name] = decode(workbench.load_model(workspace.adapter_path(adapter_name))[0])
        if composed:
            composition = workspace.composition(composed, data_dir)
            reports["router-composed (" + ", ".join(composition.labels) + ")"] = decode(composition.model)
        legend = ('<p><span style="background:#d0d0d0;padding:1px 4px">masked</span> '
                  '<span style="background:#ffb347;padding:1px 4px">revealed at this step</span> '
                  '<span style="background:#8fd18f;padding:1px 4px">settled</span></p>')
        return legend + "<hr>".join(trajectory_html(k, v) for k, v in reports.items()), \
            workbench.trajectory_figure(reports)

    # ---- Compare -------------------------------------------------------------------------

    @readable_errors
    def show_results(path):
        if not path:
            raise UserError("give a results.json written by `lora-diffusion compare`")
        results = read_json(_results_path(path))
        if "rows" not in results or "budget" not in results:
            raise UserError("that file is not a `lora-diffusion compare` results file")
        fig = comparison_figure(results)
        return compare_markdown(results), fig

    # ---- Analyse -------------------------------------------------------------------------

    def _paths(names) -> list:
        if not names:
            raise UserError("pick one or more adapters first (train one in the Train tab)")
        return [workspace.adapter_path(n) for n in names]

    @readable_errors
    def effective_rank(names, examples, steps, progress=gr.Progress()):
        from lora_diffusion.analysis.rank import effective_rank_figure, effective_rank_report

        progress(0, desc="decoding held-out prompts with every adapter")
        report = effective_rank_report(_paths(names), data_dir=data_dir, n_examples=int(examples), steps=int(steps))
        note = ("Effective rank = exp(entropy of the normalised singular values) of the per-token "
                "perturbations at each step; t = 1 is the all-masked start. " + " · ".join(
                    f"{r['label']}: {r['effective_rank'][0]:.1f} → {r['effective_rank'][-1]:.1f}"
                    for r in report["methods"]))
        return note, effective_rank_figure(report), None

    @readable_errors
    def trajectory_tsne(names, examples, steps, projection, progress=gr.Progress()):
        from lora_diffusion.analysis.tsne import trajectory_figure, trajectory_map

        progress(0, desc=f"collecting trajectories, then {projection}")
        report = trajectory_map(_paths(names), data_dir=data_dir, n_examples=int(examples), steps=int(steps),
                                method=projection)
        note = (f"trustworthiness of the 2-D map: perturbations {report['perturbations']['trustworthiness']:.3f}, "
                f"base trajectories {report['base']['trustworthiness']:.3f} (1 = neighbourhoods kept)")
        return note, trajectory_figure(report, "perturbations", "task"), trajectory_figure(report, "base", "step")

    @readable_errors
    def forgetting(names, examples, progress=gr.Progress()):
        from lora_diffusion.analysis.forgetting import forgetting_figure, forgetting_report

        progress(0, desc="scoring held-out generic text under the base and every adapter")
        report = forgetting_report(_paths(names), data_dir=data_dir, rows=int(examples))
        return ("Held-out NELBO (nats per token; lower is better) of generic text: a fine-tuned model "
                "above the base has forgotten some language modelling."), forgetting_figure(report), None

    @readable_errors
    def route(names, instruction, progress=gr.Progress()):
        if not instruction.strip():
            raise UserError("type an instruction")
        progress(0, desc="training the router (once per set of adapters)")
        composition = workspace.composition(names or [], data_dir)
        weights = composition.instruction_weights([instruction])[0].tolist()
        return workbench.router_weights_figure(composition.labels, weights, instruction)

    @readable_errors
    def show_scaling(path):
        from lora_diffusion.analysis.scaling import scaling_figures

        if not path:
            raise UserError("give the scaling.json written by `lora-diffusion analyze scaling`")
        report = read_json(_results_path(path))
        if report.get("analysis") != "rank_scaling":
            raise UserError("that file is not a rank-scaling results file (`lora-diffusion analyze scaling`)")
        figures = scaling_figures(report)
        return figures["training"], figures["generation"]

    def ld_choices() -> list[str]:
        return [a["name"] for a in workspace.adapters() if a["method"] == "lora_diffusion"]

    with gr.Blocks(title="lora-diffusion workbench") as demo:
        gr.Markdown("# lora-diffusion workbench\nParameter-efficient fine-tuning of a masked diffusion LM, "
                    "on the CPU, offline. Every number here is measured on held-out data.")
        job_id = gr.State("")
        with gr.Tab("Train"):
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
                    ranks_in = gr.Textbox("64,32,8", label="LoRA-Diffusion ranks per phase (early, middle, late)")
                    with gr.Row():
                        k_in = gr.Number(2, label="modules per phase k", precision=0)
                        lrank_in = gr.Number(0.01, label="λ rank")
                        lorth_in = gr.Number(0.001, label="λ orth")
                    r_in = gr.Number(16, label="LoRA / DoRA rank r", precision=0)
                with gr.Column():
                    lr_in = gr.Number(0, label="learning rate (0 = the method's default)")
                    steps_in = gr.Number(200, label="steps", precision=0)
                    batch_in = gr.Number(16, label="batch size", precision=0)
                    seed_in = gr.Number(0, label="seed", precision=0)
                    with gr.Row():
                        start_btn = gr.Button("Train", variant="primary")
                        stop_btn = gr.Button("Stop")
            status = gr.Markdown("", elem_id="train-status")
            with gr.Row():
                loss_plot = gr.Plot(label="loss and held-out score", elem_id="loss-plot")
                metric = gr.Markdown("", elem_id="train-metric")
            gr.Markdown("### Adapters in this workspace")
            adapters = gr.Dataframe(adapter_table(), headers=["name", "method", "task", "held-out acc. %", "params"],
                                    interactive=False)
            with gr.Row():
                pick = gr.Dropdown(adapter_choices(), label="adapter", allow_custom_value=True)
                download_btn = gr.Button("Prepare download")
                download_file = gr.File(label="adapter zip")
            with gr.Row():
                upload_files = gr.File(label="upload an adapter (zip, or its .safetensors + .json)",
                                       file_types=[".zip", ".safetensors", ".json"], file_count="multiple",
                                       type="filepath")
                upload_btn = gr.Button("Import")
                upload_msg = gr.Markdown("")

        with gr.Tab("Generate"):
            with gr.Row():
                gen_adapter = gr.Dropdown([BASE_ONLY] + adapter_choices(), value=BASE_ONLY, label="adapter", elem_id="gen-adapter",
                                          allow_custom_value=True)
                refresh_btn = gr.Button("Refresh adapters")
            instruction_in = gr.Textbox("is the sentiment of this review positive or negative ?", label="instruction")
            input_in = gr.Textbox("the film is not bad at all , i loved it .", label="input")
            with gr.Row():
                length_in = gr.Slider(1, 32, value=4, step=1, label="response length (tokens)")
                gsteps_in = gr.Slider(1, 64, value=4, step=1, label="denoising steps")
                temp_in = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="temperature")
                gseed_in = gr.Number(0, label="seed", precision=0)
            gen_composed = gr.Dropdown(ld_choices(), multiselect=True, allow_custom_value=True,
                                       label="also router-composed from these LoRA-Diffusion adapters "
                                             "(one per task; the router trains once)")
            gen_btn = gr.Button("Generate", variant="primary")
            gen_html = gr.HTML(elem_id="trajectory")
            gen_plot = gr.Plot(label="perturbation norm per step")

        with gr.Tab("Analyse"):
            with gr.Row():
                an_adapters = gr.Dropdown(adapter_choices(), multiselect=True, label="adapters to analyse", elem_id="analyse-adapters",
                                          allow_custom_value=True)
                an_refresh = gr.Button("Refresh adapters")
            with gr.Row():
                an_examples = gr.Slider(8, 256, value=32, step=8, label="held-out examples (rows of text for forgetting)")
                an_steps = gr.Slider(2, 64, value=8, step=1, label="denoising steps")
                an_projection = gr.Radio(["tsne", "pca"], value="tsne", label="projection")
            with gr.Row():
                rank_btn = gr.Button("Effective rank per step")
                tsne_btn = gr.Button("Trajectory t-SNE")
                forget_btn = gr.Button("Forgetting")
            an_note = gr.Markdown(elem_id="analysis-note")
            an_plot = gr.Plot(label="analysis", elem_id="analysis-plot")
            an_plot2 = gr.Plot(label="base trajectories")
            gr.Markdown("### Router weights for an instruction\nPick LoRA-Diffusion adapters of different tasks; "
                        "the router is trained on their instructions once, then answers instantly.")
            with gr.Row():
                router_adapters = gr.Dropdown(ld_choices(), multiselect=True, label="LoRA-Diffusion adapters",
                                              allow_custom_value=True)
                router_text = gr.Textbox("does this review sound positive or negative ?", label="instruction")
                router_btn = gr.Button("Route")
            router_plot = gr.Plot(label="router weights")

        with gr.Tab("Compare"):
            results_path = gr.Textbox("results/compare_sst2.json", label="results file of `lora-diffusion compare`")
            show_btn = gr.Button("Show")
            results_md = gr.Markdown()
            results_plot = gr.Plot()
            gr.Markdown("### Memory and speed against rank")
            scaling_path = gr.Textbox("results/analysis/scaling/scaling.json",
                                      label="results file of `lora-diffusion analyze scaling`")
            scaling_btn = gr.Button("Show scaling")
            scaling_train = gr.Plot(label="training")
            scaling_gen = gr.Plot(label="generation")

        train_inputs = [task_in, csv_in, text_col, label_col, max_train, method_in, ranks_in, k_in, lrank_in,
                        lorth_in, r_in, lr_in, steps_in, batch_in, seed_in]
        start_btn.click(train, train_inputs, [job_id, status, loss_plot, metric, adapters], concurrency_limit=4)
        stop_btn.click(stop, job_id, status, concurrency_limit=None)
        download_btn.click(download, pick, download_file)
        upload_btn.click(upload, upload_files, [upload_msg, adapters, pick])
        def refreshed():
            names, ld = adapter_choices(), ld_choices()
            return (gr.update(choices=[BASE_ONLY] + names), gr.update(choices=names), gr.update(choices=ld),
                    gr.update(choices=names), gr.update(choices=ld))

        choice_lists = [gen_adapter, pick, gen_composed, an_adapters, router_adapters]
        refresh_btn.click(refreshed, None, choice_lists)
        an_refresh.click(refreshed, None, choice_lists)
        gen_btn.click(generate, [gen_adapter, gen_composed, instruction_in, input_in, length_in, gsteps_in, temp_in,
                                 gseed_in], [gen_html, gen_plot])
        rank_btn.click(effective_rank, [an_adapters, an_examples, an_steps], [an_note, an_plot, an_plot2])
        tsne_btn.click(trajectory_tsne, [an_adapters, an_examples, an_steps, an_projection], [an_note, an_plot, an_plot2])
        forget_btn.click(forgetting, [an_adapters, an_examples], [an_note, an_plot, an_plot2])
        router_btn.click(route, [router_adapters, router_text], router_plot)
        show_btn.click(show_results, results_path, [results_md, results_plot])
        scaling_btn.click(show_scaling, scaling_path, [scaling_train, scaling_gen])
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workspace", default="runs/app", help="folder for runs and adapters")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder of the real datasets")
    args = parser.parse_args(argv)
    demo = build(workbench.Workspace(args.workspace), args.data_dir)
    demo.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port,
                                                   max_file_size="200mb", show_error=False)


if __name__ == "__main__":
    main()
