"""Every plotly figure of the project, made from the plain data that runs and analyses return.

Nothing here computes a result: each function draws a report (or a run's log) that a
library function produced, so the CLI, the app and the notebooks show the same figures.
`write_figure` saves one as a self-contained HTML page (and optionally a PNG).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .diffusion import PHASE_BOUNDARIES
from .errors import UserError
from .files import write_bytes, write_text
from .metrics import metric_of


def write_figure(path, figure, png: bool = False) -> None:
    """A plotly figure as a self-contained HTML page (plotly.js embedded: opens offline).

    `png` also writes `path` with a .png suffix (for the README), through kaleido, which
    drives a local Chrome/Chromium: the `figures` extra, and BROWSER_PATH if the browser
    is not where kaleido looks (Debian's /usr/bin/chromium is tried).
    """
    write_text(path, figure.to_html(include_plotlyjs=True, full_html=True))
    if png:
        write_png(Path(path).with_suffix(".png"), figure)


MAX_FIGURE_JSON = 20 * 2**20  # characters of a figure sent back for download (a t-SNE map of 256 examples is ~1 MB)


def figure_from_json(text) -> go.Figure:
    """A plotly figure from its JSON (as a page shows it and sends it back); what is not a figure's
    property is dropped, anything else that is not a figure is one readable line."""
    if not isinstance(text, str) or len(text) > MAX_FIGURE_JSON or not text.lstrip().startswith("{"):
        raise UserError(f"that is not a figure of this page (at most {MAX_FIGURE_JSON // 2**20} MB of JSON)")
    try:
        import plotly.io as pio

        return pio.from_json(text, output_type="Figure", skip_invalid=True)
    except Exception:  # plotly's own errors on a bad figure are ValueError, TypeError, KeyError, ...
        raise UserError("that is not a figure of this page") from None


def png_available() -> bool:
    """Whether kaleido (the `figures` extra) is installed; a PNG still needs Chrome or Chromium."""
    return importlib.util.find_spec("kaleido") is not None


def write_png(path, figure, width: int = 900, height: int = 500) -> None:
    """A static PNG of a plotly figure, written atomically."""
    try:
        import kaleido  # noqa: F401  (the optional `figures` extra)
    except ImportError:
        raise UserError("PNG figures need kaleido: pip install 'lora-diffusion[figures]'") from None
    if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").is_file():
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
    try:
        image = figure.to_image(format="png", width=width, height=height, scale=1)
    except Exception as err:  # kaleido found no browser, or the browser failed
        raise UserError(f"could not render {Path(path).name}: {str(err).strip().splitlines()[0]} "
                        "(kaleido needs Chrome or Chromium; set BROWSER_PATH to it)") from None
    write_bytes(path, image)


def training_figure(records: list[dict], title: str = "Training"):
    """Train loss (left axis) and the periodic held-out monitor score (right axis) against step."""
    fig = go.Figure()
    losses = [r for r in records if "loss" in r]
    fig.add_trace(go.Scatter(x=[r["step"] for r in losses], y=[r["loss"] for r in losses],
                             mode="lines+markers", name="train loss"))
    for key, name in (("eval_monitor_accuracy", "held-out accuracy"), ("eval_monitor_rouge_l", "held-out ROUGE-L")):
        points = [r for r in records if key in r]
        if points:
            fig.add_trace(go.Scatter(x=[r["step"] for r in points], y=[r[key] for r in points], yaxis="y2",
                                     mode="lines+markers", name=name))
    fig.update_layout(template="plotly_white", title=title, xaxis_title="step", yaxis_title="diffusion loss",
                      yaxis2=dict(title="held-out score", overlaying="y", side="right", range=[0, 1]),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def perturbation_norm_figure(trajectories: dict[str, dict]):
    """Perturbation norm per denoising step, one line per model that has a step hook."""
    fig = go.Figure()
    for label, report in trajectories.items():
        norms = [s["perturbation_norm"] for s in report["steps"]]
        if any(n is not None for n in norms):
            fig.add_trace(go.Scatter(x=[s["t"] for s in report["steps"]], y=norms, mode="lines+markers", name=label))
    if not fig.data:  # say why the frame is empty rather than leave it blank
        fig.add_annotation(text="No δ_t to show: only LoRA-Diffusion with injection=final adds one after the "
                                "body.<br>Adapters acting inside it (blocks, weights, weight LoRA, ...) change "
                                "h_t there:<br>Analyse → effective rank measures that change.",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(template="plotly_white", title="Per-step perturbation norm ‖δ_t‖ (mean over response tokens)",
                      xaxis_title="t (1 = all masked)", yaxis_title="‖δ_t‖", xaxis_autorange="reversed")
    return fig


def instruction_router_figure(labels: list[str], weights: list[float], instruction: str):
    """Bar chart of a router's weights over its task adapters for one instruction."""
    fig = go.Figure(go.Bar(x=labels, y=weights, text=[f"{w:.2f}" for w in weights], textposition="auto"))
    fig.update_layout(template="plotly_white", yaxis_range=[0, 1], yaxis_title="router weight",
                      title=f"Router weights for: {instruction[:80]}")
    return fig


def router_weights_figure(report: dict):
    """Heatmap: router weight of each adapter for every instruction (held-out ones marked)."""
    rows = report["router_weights"]
    labels = [f"{'[held-out] ' if r['group'] == 'heldout' else ''}{r['instruction'][:60]}" for r in rows]
    fig = go.Figure(go.Heatmap(z=[r["weights"] for r in rows], x=report["tasks"], y=labels, zmin=0, zmax=1,
                               colorscale="Blues", colorbar_title="weight"))
    fig.update_layout(title="Router weights per instruction", xaxis_title="task adapter",
                      yaxis_autorange="reversed", template="plotly_white", height=max(400, 22 * len(rows)))
    return fig


def interference_figure(report: dict):
    inter = report["interference"]
    fig = go.Figure(go.Heatmap(z=inter["scores"], x=inter["columns_task"], y=inter["rows_adapter"],
                               colorscale="Viridis", text=[[f"{100 * v:.1f}" for v in row] for row in inter["scores"]],
                               texttemplate="%{text}"))
    fig.update_layout(title="Interference: adapter (row) applied alone to task (column)", template="plotly_white",
                      xaxis_title="task", yaxis_title="adapter")
    return fig


def effective_rank_figure(report: dict):
    """One line per method: effective rank against the step's t (high noise on the left)."""
    fig = go.Figure()
    for row in report["methods"]:
        fig.add_trace(go.Scatter(x=row["t"], y=row["effective_rank"], mode="lines+markers", name=row["label"],
                                 hovertemplate="t=%{x:.2f}<br>effective rank %{y:.1f}<extra>" + row["label"] + "</extra>"))
    late, early = sorted(PHASE_BOUNDARIES)  # LoRA-Diffusion's phases: early above 2/3, late below 1/3
    for boundary, label in ((early, "early | middle"), (late, "middle | late")):
        fig.add_vline(x=boundary, line_dash="dot", line_color="grey", annotation_text=label,
                      annotation_position="top", annotation_font_color="grey")
    # adapter names are long: the legend goes under the plot, which keeps the page's width
    fig.update_layout(title="Effective rank of the perturbation per denoising step",
                      xaxis_title="t, the share of the answer still masked (sampling runs left to right)",
                      yaxis_title="effective rank", xaxis_autorange="reversed", template="plotly_white",
                      legend=dict(title="method", orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0))
    return fig


def effective_rank_per_layer_figure(report: dict):
    """One heatmap per adapter: effective rank of each block's output change (rows) per step (columns)."""
    rows = [row for row in report["methods"] if "per_layer" in row]
    fig = make_subplots(rows=len(rows), cols=1, subplot_titles=[row["label"] for row in rows],
                        vertical_spacing=0.5 / max(1, len(rows)))
    for i, row in enumerate(rows, start=1):
        layers = row["per_layer"]
        ranks = [list(col) for col in zip(*layers["effective_rank"])]  # [block][step]
        fig.add_trace(go.Heatmap(z=ranks, x=[f"{t:.2f}" for t in layers["t"]], y=list(range(1, layers["blocks"] + 1)),
                                 coloraxis="coloraxis",
                                 hovertemplate="t=%{x}<br>block %{y}<br>effective rank %{z:.1f}<extra></extra>"),
                      row=i, col=1)
        fig.update_yaxes(title_text="block", row=i, col=1)
    fig.update_xaxes(title_text="t (sampling runs left to right)")
    fig.update_layout(title="Effective rank of each block's output change (fine-tuned - base) per step",
                      coloraxis=dict(colorscale="Viridis", colorbar_title="eff. rank"), template="plotly_white",
                      height=max(300, 260 * len(rows)))
    return fig


def tsne_figure(report: dict, which: str = "perturbations", colour: str = "task"):
    """Scatter of one map, coloured by task (or adapter) or by step."""
    data = report[which]
    points = data["points"]
    columns = {key: [p.get(key) for p in points] for key in ("x", "y", "task", "adapter", "step", "t", "phase", "example")}
    columns = {k: v for k, v in columns.items() if any(x is not None for x in v)}
    fig = px.scatter(columns, x="x", y="y", color=colour, symbol="phase" if colour != "phase" else None,
                     hover_data=[k for k in ("adapter", "example", "t") if k in columns],
                     color_continuous_scale="Viridis" if colour in ("step", "t") else None,
                     title=f"{'Perturbations' if which == 'perturbations' else 'Base hidden states'} per example and "
                           f"step ({report['method'].upper()}, trustworthiness {data['trustworthiness']:.2f})")
    fig.update_layout(template="plotly_white", xaxis_title="", yaxis_title="")
    if colour in ("step", "t"):  # the colour bar takes the right edge: the phase legend goes below the plot
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.08, xanchor="left", x=0))
    return fig


def forgetting_figure(report: dict):
    """Grouped bars: NELBO per text source for the base and each fine-tuned model."""
    fig = go.Figure()
    for source in report["sources"]:
        fig.add_trace(go.Bar(name=source, x=[m["label"] for m in report["models"]],
                             y=[m["scores"][source]["nelbo"] for m in report["models"]]))
    fig.update_layout(barmode="group", template="plotly_white", yaxis_title="held-out NELBO (nats/token)",
                      title="Forgetting: generic held-out text under each model (lower is better)")
    return fig


def data_efficiency_figure(report: dict):
    key = metric_of(report["points"][0])
    fig = go.Figure()
    for method in dict.fromkeys(p["method"] for p in report["points"]):
        pts = [p for p in report["points"] if p["method"] == method]
        fig.add_trace(go.Scatter(x=[p["n_train"] for p in pts], y=[100 * p[key]["mean"] for p in pts],
                                 error_y={"type": "data", "array": [100 * p[key]["std"] for p in pts]},
                                 mode="lines+markers", name=method))
    fig.update_layout(title=f"Data efficiency on {report['task']['task']} ({report['steps']} steps × "
                            f"{report['batch_size']}, mean ± std over {len(report['seeds'])} seeds)",
                      xaxis_type="log", xaxis_title="training examples",
                      yaxis_title=f"held-out {key.replace('_', '-')} (%)", template="plotly_white")
    return fig


def runs_figure(runs: list[dict]):
    """Held-out score per run of a workspace (`Workspace.adapters`), a bar per run coloured by method;
    a run with no score (stopped) is named in the title instead."""
    scored = [r for r in runs if r["score"] is not None]
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in scored):
        mine = [r for r in scored if r["method"] == method]
        fig.add_trace(go.Bar(x=[r["name"] for r in mine], y=[100 * r["score"] for r in mine], name=method,
                             customdata=[[r["task"], r["metric"], r["steps"]] for r in mine],
                             hovertemplate="%{x}<br>%{customdata[0]}: held-out %{customdata[1]} %{y:.1f}%"
                                           "<br>%{customdata[2]} steps<extra>" + method + "</extra>"))
    unscored = len(runs) - len(scored)
    fig.update_layout(template="plotly_white", yaxis_title="held-out score (%)", yaxis_range=[0, 100],
                      title="Held-out score per run" + (f" ({unscored} not scored: stopped)" if unscored else ""),
                      legend_title="method", xaxis_tickangle=-30)
    return fig


def curves_figure(curves: dict[str, list[dict]]):
    """Training loss against step, one line per run (`Workspace.curve`)."""
    fig = go.Figure()
    for name, records in curves.items():
        losses = [r for r in records if r.get("loss") is not None]
        if losses:
            fig.add_trace(go.Scatter(x=[r["step"] for r in losses], y=[r["loss"] for r in losses],
                                     mode="lines", name=name))
    if not fig.data:
        fig.add_annotation(text="No logged curve yet: train a run in the Train tab.", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(template="plotly_white", title="Training loss per run", xaxis_title="step",
                      yaxis_title="diffusion loss", legend=dict(orientation="h", y=-0.25))
    return fig


def comparison_figure(results: dict):
    """Held-out score per row (mean ± std over seeds) as a plotly bar chart."""
    rows = [r for r in results["rows"] if metric_of(r) in r]  # a --sweep-only run has none
    if not rows:
        raise UserError("the results have no evaluated rows yet (a --sweep-only run?)")
    key = metric_of(rows[0])
    fig = go.Figure(go.Bar(x=[r["label"] for r in rows], y=[100 * r[key]["mean"] for r in rows],
                           error_y=dict(type="data", array=[100 * r[key]["std"] for r in rows])))
    fig.update_layout(template="plotly_white", yaxis_title=f"held-out {key} % (mean ± std over seeds)",
                      title=f"{results['task']['task']}: methods with an equal budget "
                            f"({results['budget']['steps']} steps × {results['budget']['batch_size']})")
    return fig


def scaling_figures(report: dict) -> dict:
    """plotly figures: parameters, optimizer state, peak memory and step time against rank; throughput."""
    metrics = [("trainable_parameters", "trainable parameters", 1), ("optimizer_state_bytes", "optimizer state (MB)", 2**20),
               ("peak_memory_bytes", "peak training memory (MB)", 2**20), ("sec_per_step", "train step (s)", 1)]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[m[1] for m in metrics])
    palette = {"lora": "#1f77b4", "lora_diffusion": "#d62728", "full": "#2ca02c", "adapter": "#9467bd",
               "bitfit": "#8c564b", "prefix": "#e377c2", "dora": "#17becf", "nara": "#ff7f0e", "tlora": "#bcbd22"}
    for k, (key, title, scale) in enumerate(metrics):
        r, c = k // 2 + 1, k % 2 + 1
        for method in ("lora", "lora_diffusion"):
            rows = [row for row in report["train"] if row["method"] == method]
            fig.add_trace(go.Scatter(x=[row["rank"] for row in rows], y=[row[key] / scale for row in rows],
                                     mode="lines+markers", name=method, legendgroup=method, showlegend=k == 0,
                                     line_color=palette[method]), row=r, col=c)
        for row in report["train"]:
            if row["rank"] is None:
                fig.add_trace(go.Scatter(x=report["ranks"], y=[row[key] / scale] * len(report["ranks"]), mode="lines",
                                         line_dash="dash", line_color=palette.get(row["method"]), name=row["method"],
                                         legendgroup=row["method"], showlegend=k == 0), row=r, col=c)
        fig.update_xaxes(type="log", title_text="rank", row=r, col=c)
        fig.update_yaxes(type="log" if key != "sec_per_step" else "linear", row=r, col=c)
    device = report["train"][0]["device"] if report["train"] else "?"
    fig.update_layout(title=f"Rank scaling (training, {device})", template="plotly_white", height=700)

    gen = go.Figure()
    for row in report["generate"]:
        label = row["method"] + (f" r={row['rank']}" if row["rank"] else "") + (" merged" if row["merged"] else "")
        for length in report["generation"]["lengths"]:
            points = [p for p in row["rows"] if p["response_length"] == length]
            gen.add_trace(go.Scatter(x=[p["batch_size"] for p in points], y=[p["tokens_per_s"] for p in points],
                                     mode="lines+markers", name=f"{label}, L={length}"))
    gen.update_layout(title="Generation throughput (response tokens per second)", xaxis_type="log",
                      xaxis_title="batch size", yaxis_title="tokens / s", template="plotly_white")
    return {"training": fig, "generation": gen}
