"""Analyse: effective rank per step, trajectory t-SNE, forgetting, and a router's weights."""

from __future__ import annotations

import gradio as gr

from lora_diffusion.analysis.forgetting import forgetting_report
from lora_diffusion.analysis.rank import effective_rank_report
from lora_diffusion.analysis.tsne import trajectory_map
from lora_diffusion.errors import UserError
from lora_diffusion.plots import effective_rank_figure, forgetting_figure, instruction_router_figure, tsne_figure

from . import explain
from .common import (Context, adapter_paths, figure_download, handler, names_given, readable_errors, short_text,
                     user_workspace, whole)
from .explain import knob


PROJECTIONS = ("tsne", "pca")


def _inputs(ctx: Context, user, names, examples, steps, needs_task: bool = True) -> tuple[list, int, int]:
    """The picked adapters' folders (the caller's own, checked) and the bounded sizes of an analysis.

    `needs_task`: the analysis scores each adapter on its own task, loaded by name, so that
    must be a task the workbench can load (not a CSV uploaded to train it).
    """
    paths = adapter_paths(user_workspace(ctx, user), names, needs_task)
    return paths, whole(examples, "the number of examples", 8, 256), whole(steps, "the denoising steps", 2, 64)


def steps_note(taken: dict, asked: int) -> str:
    """What the summary adds when the sampler took fewer steps than asked: `taken` is task -> steps.

    The sampler takes at most one step per answer position; two steps (a one-word answer and its
    end marker) are too few to show a trajectory."""
    short = {task: n for task, n in taken.items() if n < asked}
    if not short:
        return ""
    note = (" Steps taken (at most one per answer position): "
            + ", ".join(f"{task} {n}" for task, n in short.items()) + ".")
    if max(taken.values()) <= 2:
        note += " Too few to see a trajectory: analyse an adapter trained on suite_struct, whose answers are long."
    return note


def rank_note(report: dict, steps: int) -> str:
    """The summary line of an effective-rank report (`steps`: the steps asked), here and in the Lesson tab."""
    note = ("Effective rank = exp(entropy of the normalised singular values) of the per-token "
            "perturbations at each step; t = 1 is the all-masked start. " + " · ".join(
                f"{r['label']}: {r['effective_rank'][0]:.1f} → {r['effective_rank'][-1]:.1f}"
                for r in report["methods"]))
    taken = {r["task"]: len(r["t"]) for r in report["methods"]}
    return note + steps_note(taken, steps)


@readable_errors
def effective_rank(ctx: Context, user, names, examples, steps, progress=gr.Progress()):
    paths, examples, steps = _inputs(ctx, user, names, examples, steps)
    progress(0, desc="decoding held-out prompts with every adapter")
    report = effective_rank_report(paths, base=ctx.base, data_dir=ctx.data_dir, n_examples=examples, steps=steps)
    return rank_note(report, steps), effective_rank_figure(report), None


@readable_errors
def trajectory_tsne(ctx: Context, user, names, examples, steps, projection, progress=gr.Progress()):
    paths, examples, steps = _inputs(ctx, user, names, examples, steps)
    if projection not in PROJECTIONS:
        raise UserError(f"the projection is one of {', '.join(PROJECTIONS)}")
    progress(0, desc=f"collecting trajectories, then {projection}")
    report = trajectory_map(paths, base=ctx.base, data_dir=ctx.data_dir, n_examples=examples, steps=steps,
                            method=projection)
    note = (f"trustworthiness of the 2-D map: perturbations {report['perturbations']['trustworthiness']:.3f}, "
            f"base trajectories {report['base']['trustworthiness']:.3f} (1 = neighbourhoods kept)")
    taken = {}
    for point in report["perturbations"]["points"]:
        taken[point["task"]] = max(taken.get(point["task"], 0), point["step"] + 1)
    note += steps_note(taken, steps)
    return note, tsne_figure(report, "perturbations", "task"), tsne_figure(report, "base", "step")


@readable_errors
def forgetting(ctx: Context, user, names, examples, progress=gr.Progress()):
    paths, examples, _ = _inputs(ctx, user, names, examples, 2, needs_task=False)  # generic text, not the task
    progress(0, desc="scoring held-out generic text under the base and every adapter")
    report = forgetting_report(paths, base=ctx.base, data_dir=ctx.data_dir, rows=examples)
    return ("Held-out NELBO (nats per token; lower is better) of generic text: a fine-tuned model "
            "above the base has forgotten some language modelling."), forgetting_figure(report), None


@readable_errors
def route(ctx: Context, user, names, instruction, progress=gr.Progress()):
    ws = user_workspace(ctx, user)
    if not short_text(instruction, "the instruction").strip():
        raise UserError("type an instruction")
    names = names_given(names) if names else []
    progress(0, desc="training the router (once per set of adapters)")
    composition = ws.composition(names, ctx.data_dir, base=ctx.base)
    weights = composition.instruction_weights([instruction])[0].tolist()
    return instruction_router_figure(composition.labels, weights, instruction)


def tab(ctx: Context, user) -> dict:
    explain.accordion(explain.ANALYSE_TAB)
    with gr.Row():
        adapters = gr.Dropdown([], multiselect=True, elem_id="analyse-adapters", allow_custom_value=True,
                               **knob("Analyse", "adapters to analyse"))
        refresh_btn = gr.Button("Refresh adapters")
    with gr.Row():
        examples = gr.Slider(8, 256, value=32, step=8,
                             **knob("Analyse", "held-out examples (rows of text for forgetting)"))
        steps = gr.Slider(2, 64, value=8, step=1, **knob("Analyse", "denoising steps"))
        projection = gr.Radio(list(PROJECTIONS), value="tsne", **knob("Analyse", "projection"))
    with gr.Row():
        rank_btn = gr.Button("Effective rank per step")
        tsne_btn = gr.Button("Trajectory t-SNE")
        forget_btn = gr.Button("Forgetting")
    with gr.Column():  # the three analyses share the plots; each has its note below them
        note = gr.Markdown(elem_id="analysis-note")
        plot = gr.Plot(label="analysis", elem_id="analysis-plot")
        plot2 = gr.Plot(label="base trajectories")
        for text in (explain.EFFECTIVE_RANK, explain.TSNE, explain.FORGETTING):
            explain.accordion(text)
    gr.Markdown("### Router weights for an instruction\nPick LoRA-Diffusion adapters of different tasks; "
                "the router is trained on their instructions once, then answers instantly.")
    with gr.Row():
        router_adapters = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                      **knob("Analyse", "LoRA-Diffusion adapters"))
        router_text = gr.Textbox("does this review sound positive or negative ?", **knob("Analyse", "instruction"))
        router_btn = gr.Button("Route")
    with gr.Column():
        router_plot = gr.Plot(label="router weights")
        explain.accordion(explain.ROUTER)
    figure_download(ctx, user, {"analysis": plot, "base-trajectories": plot2, "router-weights": router_plot},
                    "download_figures_analyse")
    rank_btn.click(handler(effective_rank, ctx), [user, adapters, examples, steps], [note, plot, plot2],
                   api_name="effective_rank")
    tsne_btn.click(handler(trajectory_tsne, ctx), [user, adapters, examples, steps, projection], [note, plot, plot2],
                   api_name="trajectory_tsne")
    forget_btn.click(handler(forgetting, ctx), [user, adapters, examples], [note, plot, plot2], api_name="forgetting")
    router_btn.click(handler(route, ctx), [user, router_adapters, router_text], router_plot, api_name="route")
    return {"adapters": adapters, "router_adapters": router_adapters, "refresh": refresh_btn}
