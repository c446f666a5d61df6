"""Compare: a `lora-diffusion compare` results file as table and chart; the rank-scaling plots."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lora_diffusion.compare import markdown
from lora_diffusion.errors import UserError
from lora_diffusion.files import read_json
from lora_diffusion.paths import CHECKOUT
from lora_diffusion.plots import comparison_figure, scaling_figures

from .common import Context, handler, readable_errors


def results_path(path) -> Path:
    """A results file as typed: relative to where the app runs, else to the checkout (results/...)."""
    path = Path(path if isinstance(path, str) else path.name)
    if not path.is_absolute() and not path.exists() and CHECKOUT and (CHECKOUT / path).exists():
        return CHECKOUT / path
    return path


@readable_errors
def show_results(ctx: Context, path):
    if not path:
        raise UserError("give a results.json written by `lora-diffusion compare`")
    results = read_json(results_path(path))
    if "rows" not in results or "budget" not in results:
        raise UserError("that file is not a `lora-diffusion compare` results file")
    return markdown(results), comparison_figure(results)


@readable_errors
def show_scaling(ctx: Context, path):
    if not path:
        raise UserError("give the scaling.json written by `lora-diffusion analyze scaling`")
    report = read_json(results_path(path))
    if report.get("analysis") != "rank_scaling":
        raise UserError("that file is not a rank-scaling results file (`lora-diffusion analyze scaling`)")
    figures = scaling_figures(report)
    return figures["training"], figures["generation"]


def _shipped(relative: str) -> str:
    """A results file of the checkout as the default path, where there is a checkout."""
    return relative if CHECKOUT and (CHECKOUT / relative).is_file() else ""


def tab(ctx: Context) -> dict:
    path = gr.Textbox(_shipped("results/compare_sst2.json"), label="results file of `lora-diffusion compare`")
    show_btn = gr.Button("Show")
    table = gr.Markdown()
    chart = gr.Plot()
    gr.Markdown("### Memory and speed against rank")
    scaling_path = gr.Textbox(_shipped("results/analysis/scaling/scaling.json"),
                              label="results file of `lora-diffusion analyze scaling`")
    scaling_btn = gr.Button("Show scaling")
    scaling_train = gr.Plot(label="training")
    scaling_gen = gr.Plot(label="generation")
    show_btn.click(handler(show_results, ctx), path, [table, chart], api_name="show_results")
    scaling_btn.click(handler(show_scaling, ctx), scaling_path, [scaling_train, scaling_gen], api_name="show_scaling")
    return {}
