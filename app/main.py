"""Build and launch the workbench: four tabs over one workspace.

    lora-diffusion app [--port 7860] [--workspace runs/app]     (or: python -m lora_diffusion.app)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings to the network
import gradio as gr  # noqa: E402

from lora_diffusion.paths import default_data_dir  # noqa: E402
from lora_diffusion.workspace import Workspace  # noqa: E402

from . import analyse_tab, compare_tab, generate_tab, train_tab  # noqa: E402
from .common import BASE_ONLY, Context, adapter_names, handler  # noqa: E402


def refreshed(ctx: Context):
    """Fresh choices for every adapter list: generate, download, composed, analyse, router."""
    names, ld = adapter_names(ctx), adapter_names(ctx, "lora_diffusion")
    return (gr.update(choices=[BASE_ONLY] + names), gr.update(choices=names), gr.update(choices=ld),
            gr.update(choices=names), gr.update(choices=ld))


def build(workspace: Workspace, data_dir: str | None = None, base: str | None = None) -> gr.Blocks:
    ctx = Context(workspace, data_dir, base)
    with gr.Blocks(title="lora-diffusion workbench") as demo:
        gr.Markdown("# lora-diffusion workbench\nParameter-efficient fine-tuning of a masked diffusion LM, "
                    "on the CPU, offline. Every number here is measured on held-out data.")
        with gr.Tab("Train"):
            train = train_tab.tab(ctx)
        with gr.Tab("Generate"):
            generate = generate_tab.tab(ctx)
        with gr.Tab("Analyse"):
            analyse = analyse_tab.tab(ctx)
        with gr.Tab("Compare"):
            compare_tab.tab(ctx)
        lists = [generate["adapter"], train["pick"], generate["composed"], analyse["adapters"],
                 analyse["router_adapters"]]
        generate["refresh"].click(handler(refreshed, ctx), None, lists, api_visibility="undocumented")
        analyse["refresh"].click(handler(refreshed, ctx), None, lists, api_visibility="undocumented")
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the lora-diffusion workbench (Gradio)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workspace", default="runs/app", help="folder for runs and adapters")
    parser.add_argument("--data-dir", default=None, help="folder of the real datasets (default: ../shared/data "
                                                         "beside a checkout)")
    parser.add_argument("--base", default=None, help="base model folder (default: the shipped base)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    demo = build(Workspace(args.workspace), str(data_dir) if data_dir else None, args.base)
    demo.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port,
                                                   max_file_size="200mb", show_error=False)
