"""Compare: a `lora-diffusion compare` results file as table and chart; the rank-scaling plots.

Only results files of this workbench are offered and read: those under the checkout's
`results/` and under the workspace's `results/` (where an installed app keeps them), picked
from a list. A name not in the list is refused with one message that says nothing about
whether such a file exists.
"""

from __future__ import annotations

import gradio as gr

from lora_diffusion.compare import markdown
from lora_diffusion.errors import UserError
from lora_diffusion.files import read_json
from lora_diffusion.paths import CHECKOUT
from lora_diffusion.plots import comparison_figure, scaling_figures

from . import explain
from .common import Context, handler, readable_errors

NOT_LISTED = "not a results file of this workbench; choose one from the list"
MAX_RESULTS_BYTES = 5 * 2**20
DEFAULTS = {"compare": "results/compare_sst2.json", "scaling": "results/analysis/scaling/scaling.json"}


def _folders(ctx: Context) -> list[tuple[str, object]]:
    """(shown prefix, folder) of every place results files are read from."""
    folders = [("results", CHECKOUT / "results")] if CHECKOUT else []
    return folders + [("workspace/results", ctx.workspace.root / "results")]


def _kind(path) -> str | None:
    """'compare' or 'scaling' for a results file of that kind, else None."""
    try:
        report = read_json(path)
    except UserError:
        return None
    if isinstance(report, dict) and "rows" in report and "budget" in report:
        return "compare"
    if isinstance(report, dict) and report.get("analysis") == "rank_scaling":
        return "scaling"
    return None


def results_files(ctx: Context, kind: str) -> dict:
    """The results files of `kind` the tab may show: shown name -> path (inside its folder, symlinks resolved)."""
    found = {}
    for prefix, folder in _folders(ctx):
        if not folder.is_dir():
            continue
        inside = folder.resolve()
        for path in sorted(folder.rglob("*.json")):
            real = path.resolve()
            if (real.is_relative_to(inside) and real.is_file() and real.stat().st_size <= MAX_RESULTS_BYTES
                    and _kind(real) == kind):
                found[f"{prefix}/{path.relative_to(folder).as_posix()}"] = real
    return found


def _read(ctx: Context, name, kind: str) -> dict:
    path = results_files(ctx, kind).get(name) if isinstance(name, str) else None
    if path is None:
        raise UserError(NOT_LISTED)
    return read_json(path)


@readable_errors
def show_results(ctx: Context, name):
    results = _read(ctx, name, "compare")
    return markdown(results), comparison_figure(results)


@readable_errors
def show_scaling(ctx: Context, name):
    figures = scaling_figures(_read(ctx, name, "scaling"))
    return figures["training"], figures["generation"]


def choices(ctx: Context):
    """Fresh lists of both kinds of results file (a new `compare` run shows up on reload)."""
    return tuple(gr.update(choices=list(results_files(ctx, kind))) for kind in ("compare", "scaling"))


def _list(ctx: Context, kind: str, label: str) -> gr.Dropdown:
    names = list(results_files(ctx, kind))
    # custom values reach the handler, which refuses them with one message (gradio's own would echo them)
    return gr.Dropdown(names, value=DEFAULTS[kind] if DEFAULTS[kind] in names else None, allow_custom_value=True,
                       **explain.knob("Compare", label))


def tab(ctx: Context) -> dict:
    explain.accordion(explain.COMPARE_TAB)
    results = _list(ctx, "compare", "results file of `lora-diffusion compare`")
    show_btn = gr.Button("Show")
    with gr.Column():
        table = gr.Markdown()
        chart = gr.Plot()
        explain.accordion(explain.COMPARE_RESULTS)
    gr.Markdown("### Memory and speed against rank")
    scaling = _list(ctx, "scaling", "results file of `lora-diffusion analyze scaling`")
    scaling_btn = gr.Button("Show scaling")
    with gr.Column():
        scaling_train = gr.Plot(label="training")
        scaling_gen = gr.Plot(label="generation")
        explain.accordion(explain.SCALING)
    show_btn.click(handler(show_results, ctx), results, [table, chart], api_name="show_results")
    scaling_btn.click(handler(show_scaling, ctx), scaling, [scaling_train, scaling_gen], api_name="show_scaling")
    return {"lists": [results, scaling]}
