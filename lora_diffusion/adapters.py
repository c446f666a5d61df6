"""Adapter folders: `adapter.safetensors` (the method's state) + `adapter_config.json`.

One place saves, finds, reads and loads them; the CLI, the app, the router and the
analyses all come through here. A training run's folder holds its adapter in `adapter/`,
and everything that takes an adapter folder also takes the run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbone import Backbone, load_backbone
from .diffusion import DiffusionLM
from .errors import UserError
from .files import load_tensors, read_json, save_tensors, tensor_bytes, write_json
from .methods import Method, stored_config, stored_method
from .paths import SHIPPED_BASE

ADAPTER_FORMAT = "lora-diffusion-adapter"
ADAPTER_VERSION = 1
CONFIG_FILE, TENSORS_FILE = "adapter_config.json", "adapter.safetensors"
RUN_ADAPTER = "adapter"  # a run folder's adapter lives in run/adapter/


def adapter_folder(path) -> Path:
    """The folder that holds adapter_config.json: `path` itself, or the `adapter/` of a run folder."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / RUN_ADAPTER / CONFIG_FILE).is_file():
        return path / RUN_ADAPTER
    return path


def adapter_label(path) -> str:
    """A short name for an adapter in tables and legends: its run folder's name."""
    folder = adapter_folder(path)
    return folder.parent.name if folder.name == RUN_ADAPTER else folder.name


def read_adapter_config(path) -> dict:
    """The adapter's JSON config, refused (one line naming the field) unless every field is valid."""
    folder = adapter_folder(path)
    config = read_json(folder / CONFIG_FILE)
    check_adapter_config(config, where=f"adapter {adapter_label(folder)}")
    return config


def task_instruction(config: dict) -> str:
    """The instruction of the task an adapter was trained on ('' for a task without one)."""
    return config["task"].get("instruction") or ""


def check_adapter_config(config, where: str = "the adapter") -> None:
    """Every field `save_adapter` writes, checked for presence and type; options through the method's config.

    An adapter file comes from anyone (an upload, a colleague): what is not checked here
    would fail later as a KeyError deep inside a command.
    """
    def fail(what: str):
        return UserError(f"{where} is not a valid lora-diffusion adapter: {what}")

    def field(parent: dict, key: str, kinds, name: str | None = None):
        value = parent.get(key)
        is_bool_for_int = isinstance(value, bool) and kinds is int  # JSON true is not a count
        if not isinstance(value, kinds) or is_bool_for_int:
            raise fail(f"{CONFIG_FILE} field {name or key!r} is missing or not {_kind_words(kinds)}")
        return value

    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise fail(f"{CONFIG_FILE} has no format {ADAPTER_FORMAT!r}")
    if config.get("version") != ADAPTER_VERSION:
        raise fail(f"format version {config.get('version')!r}; this release reads version {ADAPTER_VERSION}")
    method = field(config, "method", str)
    try:
        stored_config(method, field(config, "options", dict))
    except UserError as err:
        raise fail(str(err)) from None
    base = field(config, "base", dict)
    for key, kinds in (("source", str), ("fingerprint", str), ("hidden_size", int), ("vocab_size", int)):
        field(base, key, kinds, f"base.{key}")
    task = field(config, "task", dict)
    field(task, "name", str, "task.name")
    kind = field(task, "kind", str, "task.kind")
    if kind not in ("classification", "generation"):
        raise fail(f"task.kind is {kind!r}, not 'classification' or 'generation'")
    if kind == "classification":
        labels = field(task, "labels", list, "task.labels")
        if len(labels) < 2 or len(set(map(str, labels))) != len(labels) or not all(
                isinstance(w, str) and w.strip() for w in labels):
            raise fail("task.labels must be two or more distinct, non-empty words")
    if task.get("instruction") is not None:
        field(task, "instruction", str, "task.instruction")
    response_length = field(config, "response_length", int)
    max_length = field(config, "max_length", int)
    if not 1 <= response_length < max_length:
        raise fail(f"response_length {response_length} and max_length {max_length} do not fit "
                   "(1 <= response_length < max_length)")
    accounting = field(config, "accounting", dict)
    for key in ("trainable_parameters", "adapter_parameters", "adapter_bytes"):
        if field(accounting, key, int, f"accounting.{key}") < 0:
            raise fail(f"accounting.{key} is negative")


def check_adapter(path) -> tuple[dict, dict]:
    """(config, tensors) of an adapter folder, checked as a whole without loading a base: the config's
    fields, and tensors that are finite and add up to what its accounting says.

    The names and shapes of the tensors are checked when the method is attached to its base
    (`load_adapter`): they depend on the base.
    """
    folder = adapter_folder(path)
    config = read_adapter_config(folder)
    where = f"adapter {adapter_label(folder)}"
    tensors = load_tensors(folder / TENSORS_FILE)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: tensor {name} holds NaN or infinite values; the adapter is broken "
                            "(was its training diverging?)")
    counted = {"adapter_parameters": sum(t.numel() for t in tensors.values()),
               "adapter_bytes": tensor_bytes(tensors)}
    for key, value in counted.items():
        if config["accounting"][key] != value:
            raise UserError(f"{where}: {TENSORS_FILE} holds {value:,} {key.split('_')[1]}, but its config "
                            f"says {config['accounting'][key]:,}; the two files do not belong together")
    return config, tensors


def _kind_words(kind: type) -> str:
    return {str: "text", int: "an integer", dict: "an object", list: "a list"}[kind]


def save_adapter(folder, method: Method, backbone: Backbone, base_fingerprint: str, task, response_length: int,
                 max_length: int, train_summary: dict | None = None) -> dict:
    """Write a method's trained state and everything needed to use it again."""
    folder = Path(folder)
    config = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
        "method": method.name, "options": method.options(),
        "base": {"source": backbone.label, "fingerprint": base_fingerprint,
                 "hidden_size": backbone.hidden_size, "vocab_size": backbone.vocab_size},
        "task": {"name": task.name, "kind": task.kind, "labels": task.labels,
                 "instruction": task.train[0]["instruction"] if task.train else None, "source": task.source},
        "response_length": response_length, "max_length": max_length,
        "accounting": method.accounting(),
        "train": {k: v for k, v in (train_summary or {}).items() if k != "eval"},
    }
    save_tensors(folder / TENSORS_FILE, method.state_dict(), metadata={"format": ADAPTER_FORMAT})
    if hasattr(method, "save_peft"):  # weight LoRA / DoRA: also peft's own layout
        method.save_peft(folder / "peft")
    write_json(folder / CONFIG_FILE, config)  # written last: a complete adapter has it
    return config


def base_for(config: dict, base=None, where="the adapter") -> Backbone:
    """The base an adapter runs on: `base` (a folder, 'hf:NAME' or a loaded Backbone), else the one
    its config records; refused if its fingerprint is not the one the adapter was trained on."""
    if isinstance(base, Backbone):
        backbone = base
    else:
        source = config["base"]["source"]
        backbone = load_backbone(base or (SHIPPED_BASE if source == "shipped" else source))
    found = backbone.fingerprint()
    if found != config["base"]["fingerprint"]:
        raise UserError(f"{where} was trained on a base with fingerprint "
                        f"{config['base']['fingerprint']}, but {backbone.source} has {found}; "
                        "load it with the base it was trained on (--base)")
    return backbone


def load_adapter(path, base=None, merge: bool = True) -> tuple[DiffusionLM, Method, dict]:
    """(model, method, config) for a saved adapter, in eval mode.

    `base` is a model folder, 'hf:NAME', an already loaded Backbone, or None for the base
    recorded in the adapter's config. A mergeable method is merged into the base for
    inference unless `merge` is False.
    """
    folder = adapter_folder(path)
    config, tensors = check_adapter(folder)
    model, method = with_adapter(base_for(config, base, where=f"adapter {adapter_label(folder)}"),
                                 config["method"], config["options"], tensors)
    if merge and method.can_merge:
        method.merge()
    return model, method, config


def with_adapter(backbone: Backbone, method_name: str, options: dict, tensors: dict) -> tuple[DiffusionLM, Method]:
    """(model, method): `backbone` with the method attached and `tensors` (its state) loaded, in eval mode."""
    model = DiffusionLM(backbone)
    method = stored_method(method_name, options)
    method.attach(model)
    method.load_state_dict(tensors)  # refuses missing, unexpected or misshapen tensors
    return model.eval(), method


def load_model(adapter=None, base=None) -> tuple[DiffusionLM, Method | None, dict | None]:
    """(model, method or None, adapter config or None): the base alone, or base + a saved adapter."""
    if adapter is None:
        return DiffusionLM(load_backbone(base)).eval(), None, None
    return load_adapter(adapter, base=base, merge=True)
