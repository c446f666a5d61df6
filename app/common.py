"""What every tab shares: the workspace it works in, readable errors, the adapter lists."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import gradio as gr

from lora_diffusion.errors import UserError
from lora_diffusion.metrics import percent
from lora_diffusion.workspace import Workspace

BASE_ONLY = "(base model, no adapter)"


@dataclass
class Context:
    """The app's state that outlives a request: the workspace, the real datasets, the base."""

    workspace: Workspace
    data_dir: str | None = None
    base: str | None = None  # a model folder; None: the shipped base


def readable_errors(fn):
    """Show every failure as a one-line message in the page, never a traceback."""
    def message(e: Exception) -> str:
        return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"

    if inspect.isgeneratorfunction(fn):  # stream its updates
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


def handler(fn, ctx: Context):
    """`fn` with the app's context bound as its first argument (gradio sees the other parameters)."""
    return functools.partial(fn, ctx)


def adapter_names(ctx: Context, method: str | None = None) -> list[str]:
    """The workspace's adapters, newest first (only those of `method`, if given)."""
    return [a["name"] for a in ctx.workspace.adapters() if method is None or a["method"] == method]


TABLE_HEADERS = ["name", "method", "task", "held-out score %", "metric", "params"]


def adapter_table(ctx: Context) -> list[list]:
    return [[a["name"], a["method"], a["task"], percent(a["score"]), a["metric"] or "",
             f"{a['trainable_parameters']:,}"] for a in ctx.workspace.adapters()]


def adapter_paths(ctx: Context, names) -> list:
    if not names:
        raise UserError("pick one or more adapters first (train one in the Train tab)")
    return [ctx.workspace.adapter_path(n) for n in names]
