"""Build and launch the workbench: four tabs over one workspace, a folder of its own for every browser user.

    lora-diffusion app [--port 7860] [--workspace runs/app]     (or: python -m lora_diffusion.app ...)

A browser gets a random user id on its first visit, kept in its localStorage
(`gr.BrowserState`), so a reload finds the same adapters (and follows a job still training);
every handler works in that user's workspace (W/users/<id>/), and shows the operator's shared
adapters (W/shared/) only when asked.
"""

from __future__ import annotations

import os
import secrets

# Offline by design, set before gradio (and through it huggingface_hub, datasets) reads them: no usage
# pings, and nothing is fetched from or looked up on the Hugging Face hub.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import gradio as gr  # noqa: E402

from lora_diffusion.errors import UserError  # noqa: E402
from lora_diffusion.files import read_json, write_json  # noqa: E402
from lora_diffusion.paths import default_data_dir  # noqa: E402
from lora_diffusion.uploads import MAX_UPLOAD_BYTES  # noqa: E402
from lora_diffusion.workspace import JobLimits, Workspace  # noqa: E402

from . import analyse_tab, compare_tab, explain, generate_tab, lesson_tab, train_tab  # noqa: E402
from .common import (BASE_ONLY, Context, adapter_lists, broken_note, handler, readable_errors,  # noqa: E402
                     user_workspace)

USER_STORAGE_KEY = "lora-diffusion-user"  # where the browser keeps its (encrypted) user id
CACHE_SECONDS = 3600  # uploads (and gradio's copies of downloads) are removed after an hour, checked hourly
SHARED_LABEL = "also show the shared adapters (read-only, from the workspace's shared/ folder)"
# A refusal is shown as its message (a toast): gradio's "Error" badge over the outputs, which would hide what
# they showed (the last run's loss curve, the adapters table), is not shown.
PAGE_CSS = "[data-testid='status-tracker']:has(span.error) { display: none !important; }"


@readable_errors
def refreshed(ctx: Context, user, shared):
    """Fresh choices for every adapter list: generate, download, composed, analyse, router; Compare's view of
    the runs (`compare_tab.runs_view`); the table and the skipped folders."""
    ws = user_workspace(ctx, user)
    names, ld, table = adapter_lists(ws, shared)
    return (gr.update(choices=[BASE_ONLY] + names), gr.update(choices=names), gr.update(choices=ld),
            gr.update(choices=names), gr.update(choices=ld), *compare_tab.runs_view(ws, shared), table,
            broken_note(ws))


@readable_errors
def session(ctx: Context, user, shared):
    """A page opens: its user id (a new one for a new browser, or one whose stored id is not valid) and
    that user's adapter lists."""
    try:
        user_workspace(ctx, user)
    except UserError:
        user = secrets.token_hex(16)
    return (user, *refreshed(ctx, user, shared))


def browser_secret(workspace: Workspace) -> str:
    """The key the user id is encrypted with in the browser; kept in the workspace so a restart keeps users."""
    path = workspace.root / "browser_state.json"
    try:
        return read_json(path)["secret"]
    except (UserError, KeyError, TypeError):
        secret = secrets.token_hex(16)
        write_json(path, {"secret": secret})
        return secret


def build(workspace: Workspace, data_dir: str | None = None, base: str | None = None, uploads=None) -> gr.Blocks:
    ctx = Context(workspace, data_dir, base, uploads)
    with gr.Blocks(title="lora-diffusion workbench", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown("# lora-diffusion workbench\nParameter-efficient fine-tuning of a masked diffusion LM, "
                    "on the CPU, offline. Every number here is measured on held-out data.\n\n" + explain.INTRO)
        user = gr.BrowserState(None, storage_key=USER_STORAGE_KEY, secret=browser_secret(workspace))
        shared = gr.Checkbox(False, **explain.knob("Every tab", SHARED_LABEL))
        with gr.Tab("Train"):
            train = train_tab.tab(ctx, user)
        with gr.Tab("Generate"):
            generate = generate_tab.tab(ctx, user)
        with gr.Tab("Analyse"):
            analyse = analyse_tab.tab(ctx, user)
        with gr.Tab("Compare"):
            compare = compare_tab.tab(ctx, user, shared)
        with gr.Tab("Lesson"):
            lesson = lesson_tab.tab(ctx, user)
        with gr.Accordion("Glossary: every knob of the page", open=False):
            gr.Markdown(explain.glossary())
        lists = [generate["adapter"], train["pick"], generate["composed"], analyse["adapters"],
                 analyse["router_adapters"], *compare["runs"], train["table"], train["broken"]]
        refresh = handler(refreshed, ctx)
        # A page opens (or reloads): its user's adapter lists, then their job still training, if any, until it ends.
        opened = demo.load(handler(session, ctx), [user, shared], [user] + lists, api_visibility="undocumented")
        opened.then(handler(train_tab.follow, ctx), user, train["job"], api_visibility="undocumented",
                    concurrency_limit=None).then(refresh, [user, shared], lists, api_visibility="undocumented")
        demo.load(handler(compare_tab.choices, ctx), None, compare["lists"], api_visibility="undocumented")
        for trigger in (generate["refresh"].click, analyse["refresh"].click, shared.change):
            trigger(refresh, [user, shared], lists, api_visibility="undocumented")
        # a job that ended (done, stopped, failed), an import, a delete, a reset (in the Train or the Lesson tab)
        for event in train["changed"] + lesson["changed"]:
            event.then(refresh, [user, shared], lists, api_visibility="undocumented")
    return demo


def serve(workspace: str, data_dir: str | None = None, base: str | None = None, host: str = "127.0.0.1",
          port: int = 7860, job_minutes: float | None = None) -> None:
    """Start the workbench (the command line, `lora-diffusion app`, checks the arguments).

    `job_minutes`: the training time of one job (None: JobLimits' default, 0: no limit).
    """
    data_dir = data_dir or default_data_dir()
    limits = JobLimits() if job_minutes is None else JobLimits(seconds=job_minutes * 60 or None)
    demo = build(Workspace(workspace, limits=limits), str(data_dir) if data_dir else None, base)
    demo.queue(default_concurrency_limit=2).launch(server_name=host, server_port=port, css=PAGE_CSS,
                                                   max_file_size=MAX_UPLOAD_BYTES, show_error=False)
