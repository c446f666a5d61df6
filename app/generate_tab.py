"""Generate: watch the response unmask step by step, base vs adapter vs router-composed."""

from __future__ import annotations

import html

import gradio as gr

from lora_diffusion.adapters import load_model
from lora_diffusion.bounds import MAX_SEED
from lora_diffusion.analysis.trajectories import denoising_trajectory
from lora_diffusion.data import SENTIMENT_INSTRUCTION
from lora_diffusion.errors import UserError
from lora_diffusion.plots import perturbation_norm_figure

from . import explain
from .common import (BASE_ONLY, MAX_LENGTH, MAX_TEXT, Context, adapter_paths, figure_download, handler, number,
                     readable_errors, short_text, user_workspace, whole)
from .explain import knob

COLOURS = {"masked": "#d0d0d0", "new": "#ffb347", "settled": "#8fd18f"}
LEGEND = ('<p><span style="background:#d0d0d0;padding:1px 4px">masked</span> '
          '<span style="background:#ffb347;padding:1px 4px">revealed at this step</span> '
          '<span style="background:#8fd18f;padding:1px 4px">settled</span></p>')


def trajectory_html(label: str, report: dict) -> str:
    """One model's decoding as coloured tokens, a line per step."""
    rows = []
    for i, s in enumerate(report["steps"]):
        cells = "".join(f'<span style="background:{COLOURS[st]};padding:1px 4px;margin:1px;border-radius:3px;'
                        f'font-family:monospace">{html.escape(tok)}</span>'
                        for tok, st in zip(s["tokens"], s["state"]))
        norm = "" if s["perturbation_norm"] is None else f" ‖δ‖={s['perturbation_norm']:.2f}"
        rows.append(f"<div>step {i + 1} (t={s['t']:.2f}{norm}): {cells}</div>")
    return f"<h4>{html.escape(label)}: “{html.escape(report['answer'])}”</h4>" + "".join(rows)


@readable_errors
def generate(ctx: Context, user, adapter_name, composed, instruction, text, length, steps, temperature, seed):
    """Decode the prompt with the base, the chosen adapter and (optionally) a router over several."""
    ws = user_workspace(ctx, user)
    adapter = ws.adapter_path(adapter_name) if adapter_name and adapter_name != BASE_ONLY else None
    if composed:
        adapter_paths(ws, composed, needs_task=True)  # every name checked before anything is loaded
    instruction, text = short_text(instruction, "the instruction"), short_text(text, "the input")
    length, steps = whole(length, "the response length", 1, MAX_LENGTH), whole(steps, "the denoising steps", 1, 64)
    temperature, seed = number(temperature, "the temperature", 0, 1.5), whole(seed, "the seed", 0, MAX_SEED)

    def decode(model) -> dict:
        return denoising_trajectory(model, instruction, text, length, steps, temperature, seed)

    reports = {"base": decode(load_model(base=ctx.base)[0])}
    if adapter is not None:
        reports[adapter_name] = decode(load_model(adapter, base=ctx.base)[0])
    if composed:
        composition = ws.composition(list(composed), ctx.data_dir, base=ctx.base)
        reports["router-composed (" + ", ".join(composition.labels) + ")"] = decode(composition.model)
    return (LEGEND + "<hr>".join(trajectory_html(k, v) for k, v in reports.items()),
            perturbation_norm_figure(reports))


def decoding_of(ctx: Context, user, adapter_name):
    """The picked adapter's decoding, for the length, steps and instruction controls: its trained
    response length (positions past it were never trained, so an answer decoded longer repeats or
    wanders), the sampler steps it was scored with, and its task's instruction."""
    unchanged = (gr.update(), gr.update(), gr.update())
    if not adapter_name or adapter_name == BASE_ONLY:
        return unchanged
    try:
        decoding = user_workspace(ctx, user).decoding(adapter_name)
    except UserError:
        return unchanged  # a bad name: Generate itself says what is wrong
    return (gr.update(value=min(MAX_LENGTH, max(1, decoding["response_length"]))),
            gr.update(value=min(64, max(1, decoding["sampler_steps"]))),
            gr.update(value=decoding["instruction"][:MAX_TEXT]))


def tab(ctx: Context, user) -> dict:
    explain.accordion(explain.GENERATE_TAB)
    with gr.Row():
        gen_adapter = gr.Dropdown([BASE_ONLY], value=BASE_ONLY, elem_id="gen-adapter", allow_custom_value=True,
                                  **knob("Generate", "adapter"))
        refresh_btn = gr.Button("Refresh adapters")
    instruction_in = gr.Textbox(SENTIMENT_INSTRUCTION, **knob("Generate", "instruction"))
    input_in = gr.Textbox("the film is not bad at all , i loved it .", **knob("Generate", "input"))
    with gr.Row():
        length_in = gr.Slider(1, MAX_LENGTH, value=4, step=1, elem_id="gen-length",
                              **knob("Generate", "response length (tokens)"))
        steps_in = gr.Slider(1, 64, value=4, step=1, **knob("Generate", "denoising steps"))
        temp_in = gr.Slider(0.0, 1.5, value=0.0, step=0.1, **knob("Generate", "temperature"))
        seed_in = gr.Number(0, precision=0, **knob("Generate", "seed"))
    composed = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                           **knob("Generate", "also router-composed from these LoRA-Diffusion adapters "
                                              "(one per task; the router trains once)"))
    gen_btn = gr.Button("Generate", variant="primary")
    with gr.Column():
        gen_html = gr.HTML(elem_id="trajectory")
        explain.accordion(explain.TRAJECTORY)
    with gr.Column():
        gen_plot = gr.Plot(label="perturbation norm per step")
        explain.accordion(explain.PERTURBATION_NORM)
    figure_download(ctx, user, {"perturbation-norm": gen_plot}, "download_figures_generate")
    gen_adapter.change(handler(decoding_of, ctx), [user, gen_adapter], [length_in, steps_in, instruction_in],
                       api_visibility="undocumented")
    gen_btn.click(handler(generate, ctx), [user, gen_adapter, composed, instruction_in, input_in, length_in, steps_in,
                                           temp_in, seed_in], [gen_html, gen_plot], api_name="generate")
    return {"adapter": gen_adapter, "composed": composed, "refresh": refresh_btn}
