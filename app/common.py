"""What every tab shares: the workspace it works in, readable errors, checked inputs, the adapter lists,
and the button that downloads a tab's figures.

Every handler's input comes from a page or from an API call, that is from anyone: names are
checked by the workspace (`Workspace.user`, `adapter_path`), files by `uploaded`, numbers by
`whole` / `number`; a refusal is one line without server paths (`readable_errors`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from lora_diffusion.errors import UserError
from lora_diffusion.metrics import percent
from lora_diffusion.paths import SHIPPED_BASE
from lora_diffusion.plots import figure_from_json, png_available
from lora_diffusion.workspace import Workspace, public_message

from . import explain

BASE_ONLY = "(base model, no adapter)"
MAX_TEXT = 2000  # characters of an instruction or input typed into a page
MAX_LENGTH = 32  # response tokens a user may ask the Generate and Compare tabs for
log = logging.getLogger("lora_diffusion.app")


@dataclass
class Context:
    """The app's state that outlives a request: the root workspace, the real datasets, the base, the uploads.

    Each browser user works in `workspace.user(id)`; `user_workspace` gives it.
    """

    workspace: Workspace
    data_dir: str | None = None
    base: str | None = None      # a model folder; None: the shipped base
    uploads: Path | None = None  # where uploads land; None: gradio's upload folder

    def __post_init__(self):
        # Always a folder we chose: left open, an adapter would be loaded on the base its config names.
        self.base = str(self.base or SHIPPED_BASE)
        self.uploads = Path(self.uploads or get_upload_folder())


def user_workspace(ctx: Context, user) -> Workspace:
    if not user:  # a button pressed before the page's opening event has given the browser its id
        raise UserError("the page has not finished opening (no user id yet): press the button again in a moment, "
                        "or reload the page if this persists")
    return ctx.workspace.user(user)


def readable_errors(fn):
    """Show every failure as one line in the page, never a traceback, never a server path.

    It is a gr.Error: an API client gets an error; the page shows the message and its outputs keep
    what they showed (`main.PAGE_CSS`)."""
    def message(e: Exception, args) -> str:
        ctx = args[0] if args and isinstance(args[0], Context) else None
        if isinstance(e, UserError):
            text = str(e)
        else:  # a bug: the traceback goes to the server log, the page gets one line
            log.error("%s failed", fn.__name__, exc_info=e)
            text = f"{type(e).__name__}: {e} (details in the server log)"
        return public_message(text, *((ctx.workspace.root, ctx.uploads) if ctx else ()))

    if inspect.isgeneratorfunction(fn):  # stream its updates
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise gr.Error(message(e, args), print_exception=False) from None  # bugs are logged above
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(message(e, args), print_exception=False) from None  # bugs are logged above
    return wrapper


def handler(fn, ctx: Context, *bound):
    """`fn` with the app's context (and `bound`, e.g. the Lesson tab's store) bound as its first arguments
    (gradio sees the other parameters)."""
    return functools.partial(fn, ctx, *bound)


def number(value, what: str, low: float, high: float) -> float:
    """A number typed into a page or sent to the API, within [low, high]; else one readable line."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{what} must be between {low:g} and {high:g}")
    return value


def whole(value, what: str, low: int, high: int) -> int:
    """A whole number within [low, high] (see `number`)."""
    value = number(value, what, low, high)
    if value != int(value):
        raise UserError(f"{what} must be a whole number")
    return int(value)


def short_text(value, what: str) -> str:
    """Text typed into a page, of a bounded length."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be text")
    if len(value) > MAX_TEXT:
        raise UserError(f"{what} is longer than {MAX_TEXT:,} characters")
    return value


def uploaded(ctx: Context, file) -> Path:
    """The path of a file uploaded to this app; anything else (a path typed into an API call) is refused."""
    path = file if isinstance(file, (str, Path)) else getattr(file, "name", None)
    if path is None or not Path(path).resolve().is_relative_to(ctx.uploads.resolve()) or not Path(path).is_file():
        raise UserError("that is not a file uploaded to this app: upload it again")
    return Path(path)


def names_given(names) -> list:
    """The adapters picked in a multi-select list (each is checked by the workspace)."""
    if not names:
        raise UserError("pick one or more adapters first (train one in the Train tab)")
    if not isinstance(names, (list, tuple)) or len(names) > 16:
        raise UserError("pick up to 16 adapters from the list")
    return list(names)


TABLE_HEADERS = ["name", "status", "method", "task", "held-out score %", "metric", "params"]


def adapter_lists(ws: Workspace, shared: bool = False) -> tuple[list[str], list[str], list[list]]:
    """The workspace's adapters, newest first (and the shared ones, if asked): every name, the
    LoRA-Diffusion ones (what a router composes), and the table rows."""
    listed = ws.adapters(bool(shared))
    table = [[a["name"], a["status"], a["method"], a["task"], percent(a["score"]), a["metric"] or "",
              f"{a['trainable_parameters']:,}"] for a in listed]
    return [a["name"] for a in listed], [a["name"] for a in listed if a["method"] == "lora_diffusion"], table


def broken_note(ws: Workspace) -> str:
    """What the last listing skipped, so a bad folder is seen instead of silently missing."""
    if not ws.broken:
        return ""
    return "Skipped (not a valid adapter): " + "; ".join(f"`{b['name']}`: {b['reason']}" for b in ws.broken)


def adapter_paths(ws: Workspace, names, needs_task: bool = False) -> list:
    """The folders of the picked adapters; `needs_task`: the caller loads their tasks by name (see
    `Workspace.adapter_path`)."""
    return [ws.adapter_path(n, needs_task) for n in names_given(names)]


@readable_errors
def download_figures(ctx: Context, stems, user, *figures):
    """The figures a tab shows, as HTML pages (and PNGs where kaleido is installed), for download:
    (files, a note on what could not be written). `stems` name the files, one per figure."""
    ws = user_workspace(ctx, user)
    if len(figures) != len(stems):
        raise UserError(f"send the tab's {len(stems)} figures")
    shown = {}
    for stem, figure in zip(stems, figures):
        if figure is None:  # a plot not drawn yet
            continue
        data = figure if isinstance(figure, dict) else getattr(figure, "model_dump", lambda: None)()
        if not isinstance(data, dict) or data.get("type") != "plotly":
            raise UserError("that is not a figure of this page")
        shown[stem] = figure_from_json(data.get("plot"))
    if not shown:
        raise UserError("no figure to download yet: make one first")
    files, note = ws.export_figures(shown, png=png_available())
    return [str(f) for f in files], note


def figure_download(ctx: Context, user, plots: dict, api_name: str) -> None:
    """A button under a tab's plots that offers them as files; `plots`: file stem -> gr.Plot."""
    with gr.Row():
        button = gr.Button(explain.FIGURES_BUTTON if png_available() else explain.FIGURES_BUTTON_HTML_ONLY)
        files = gr.File(label="figures", file_count="multiple", interactive=False)
    note = gr.Markdown("")
    button.click(functools.partial(download_figures, ctx, tuple(plots)), [user, *plots.values()], [files, note],
                 api_name=api_name)
