"""Compare: the user's runs side by side (table, score and loss charts); several adapters answering one
list of sentences at once; a `lora-diffusion compare` results file as table and chart; the rank-scaling plots.

The runs come from the user's workspace (`Workspace.adapters`, `curve`), refreshed with the adapter
lists (`main.refreshed`). Several adapters at once: every sentence is answered by every picked
column (the base, adapters, saved routers) through `mixed.side_by_side`, LoRA-Diffusion and weight
LoRA in mixed batches. Only results files of this workbench are offered and read: those under the checkout's
`results/` and under the workspace's `results/` (where an installed app keeps them), picked
from a list. A name not in the list is refused with one message that says nothing about
whether such a file exists.
"""

from __future__ import annotations

import gradio as gr

from lora_diffusion.compare import markdown
from lora_diffusion.errors import UserError
from lora_diffusion.files import read_json
from lora_diffusion.metrics import percent
from lora_diffusion.mixed import side_by_side
from lora_diffusion.paths import CHECKOUT
from lora_diffusion.plots import comparison_figure, curves_figure, runs_figure, scaling_figures
from lora_diffusion.workspace import ROUTER, Workspace

from . import explain
from .common import (BASE_ONLY, MAX_LENGTH, Context, figure_download, handler, names_given, readable_errors, short_text,
                     user_workspace, whole)
from .explain import knob

NOT_LISTED = "not a results file of this workbench; choose one from the list"
MAX_RESULTS_BYTES = 5 * 2**20
DEFAULTS = {"compare": "results/compare_sst2.json", "scaling": "results/analysis/scaling/scaling.json"}
RUN_HEADERS = ["run", "method", "task", "steps", "trainable params", "held-out score %", "metric", "train time (s)",
               "status"]
MAX_SENTENCES = 32  # sentences answered at once, by every picked column
# A plain review, a plain pan, a negation, a contrast, a negation inside a contrast: where adapters part ways.
SENTENCES = ["a gripping story with wonderful acting .",
             "the plot is dull and the jokes fall flat .",
             "the film is not bad at all .",
             "the cast is brilliant , but the story goes nowhere .",
             "i expected to hate it , yet i did not want it to end ."]


# ---- the user's runs ------------------------------------------------------------------------

def runs_view(ws: Workspace, shared: bool = False) -> tuple:
    """The Compare tab's view of the workspace (with the adapter lists, `main.refreshed`): the
    choices of 'several adapters at once', the runs table, the score chart and the loss curves."""
    runs = ws.adapters(bool(shared))
    rows = [[r["name"], r["method"], r["task"], "" if r["steps"] is None else r["steps"],
             f"{r['trainable_parameters']:,}", percent(r["score"]), r["metric"] or "",
             "" if r["train_seconds"] is None else f"{r['train_seconds']:,.1f}", r["status"]] for r in runs]
    curves = {r["name"]: ws.curve(r["name"]) for r in runs}
    columns = [BASE_ONLY] + [r["name"] for r in runs] + [(label, name) for name, label in ws.routers().items()]
    return gr.update(choices=columns), rows, runs_figure(runs), curves_figure(curves)


@readable_errors
def show_runs(ctx: Context, user, shared):
    """The runs table and charts (what `runs_view` gives) for the user: the tab's own refresh."""
    return runs_view(user_workspace(ctx, user), shared)


# ---- several adapters at once -----------------------------------------------------------------

def sentences_of(text) -> list[str]:
    """The non-empty lines of the sentences box, at most MAX_SENTENCES."""
    lines = [line.strip() for line in short_text(text, "the sentences").splitlines() if line.strip()]
    if not lines:
        raise UserError("type one or more sentences, one per line")
    if len(lines) > MAX_SENTENCES:
        raise UserError(f"{len(lines)} sentences: at most {MAX_SENTENCES} are answered at once")
    return lines


@readable_errors
def several_adapters(ctx: Context, user, names, sentences, instruction, length, progress=gr.Progress()):
    """Every sentence answered by every picked column (the base, adapters, saved routers): a table
    sentence x column. LoRA-Diffusion and weight LoRA share mixed batches; the rest decode alone."""
    ws = user_workspace(ctx, user)
    names = names_given(names)
    if not all(isinstance(n, str) for n in names):
        raise UserError("pick adapters from the list")
    names = list(dict.fromkeys(names))  # each column once
    texts = sentences_of(sentences)
    instruction = short_text(instruction, "the instruction").strip() or None
    length = whole(length, "the response length", 0, MAX_LENGTH) or None
    routers = ws.routers()
    for name in names:  # every name checked before anything is loaded
        if name != BASE_ONLY and not name.startswith(ROUTER):
            ws.adapter_path(name)
        elif name != BASE_ONLY and name not in routers:
            raise UserError("no such router in your workspace: pick one from the list")
    progress(0, desc=f"{len(texts)} sentences x {len(names)} columns")
    columns = [None if n == BASE_ONLY else ws.router(n, base=ctx.base) if n in routers else ws.adapter_path(n)
               for n in names]
    grid = side_by_side(texts, columns, base=ctx.base, instruction=instruction, length=length)
    labels = ["base" if n == BASE_ONLY else routers.get(n, n) for n in names]
    return {"headers": ["sentence"] + labels, "data": [[text] + row for text, row in zip(texts, grid)]}


# ---- results files of the project's commands ----------------------------------------------------


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


def tab(ctx: Context, user, shared) -> dict:
    """Lay out the Compare tab and wire it; returns the results lists (filled on load) and what
    `runs_view` fills with the adapter lists."""
    explain.accordion(explain.COMPARE_TAB)
    gr.Markdown("### Your runs side by side")
    runs_table = gr.Dataframe([], headers=RUN_HEADERS, interactive=False, elem_id="runs-table")
    runs_btn = gr.Button("Refresh runs")
    with gr.Column():
        runs_chart = gr.Plot(label="held-out score per run", elem_id="runs-chart")
        curves_chart = gr.Plot(label="training loss per run")
        explain.accordion(explain.COMPARE_RUNS)

    gr.Markdown("### Several adapters at once")
    explain.accordion(explain.SEVERAL_ADAPTERS)
    columns = gr.Dropdown([BASE_ONLY], value=[BASE_ONLY], multiselect=True, allow_custom_value=True,
                          elem_id="several-adapters", **knob("Compare", "adapters (and the base) to compare"))
    sentences = gr.Textbox("\n".join(SENTENCES), lines=len(SENTENCES),
                           **knob("Compare", "sentences, one per line"))
    with gr.Row():
        instruction = gr.Textbox("", **knob("Compare", "instruction (empty: each adapter its task's own)"))
        length = gr.Slider(0, MAX_LENGTH, value=0, step=1,
                           **knob("Compare", "response length (0: the longest the adapters were trained with)"))
    several_btn = gr.Button("Run", variant="primary")
    answers = gr.Dataframe(interactive=False, elem_id="several-answers", wrap=True)

    gr.Markdown("### Results files of the project's commands")
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
        scaling_train = gr.Plot(label="training", elem_id="scaling-train")
        scaling_gen = gr.Plot(label="generation", elem_id="scaling-gen")
        explain.accordion(explain.SCALING)
    figure_download(ctx, user, {"runs-score": runs_chart, "runs-loss": curves_chart, "methods": chart,
                                "scaling-training": scaling_train, "scaling-generation": scaling_gen},
                    "download_figures_compare")
    runs_view_outputs = [columns, runs_table, runs_chart, curves_chart]
    runs_btn.click(handler(show_runs, ctx), [user, shared], runs_view_outputs, api_visibility="undocumented")
    several_btn.click(handler(several_adapters, ctx), [user, columns, sentences, instruction, length], answers,
                      api_name="several_adapters")
    show_btn.click(handler(show_results, ctx), results, [table, chart], api_name="show_results")
    scaling_btn.click(handler(show_scaling, ctx), scaling, [scaling_train, scaling_gen], api_name="show_scaling")
    return {"lists": [results, scaling], "runs": runs_view_outputs}
