"""Adapter folders: `adapter.safetensors` (the method's state) + `adapter_config.json`.

One place saves, finds, reads and loads them; the CLI, the app, the router and the
analyses all come through here. A training run's folder holds its adapter in `adapter/`,
and everything that takes an adapter folder also takes the run folder.
"""

from __future__ import annotations

from pathlib import Path

from .backbone import Backbone, load_backbone
from .diffusion import DiffusionLM
from .errors import UserError
from .files import load_tensors, read_json, save_tensors, write_json
from .methods import Method, make_method
from .paths import SHIPPED_BASE

ADAPTER_FORMAT = "lora-diffusion-adapter"
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
    """The adapter's JSON config, refused unless it is one of ours."""
    folder = adapter_folder(path)
    config = read_json(folder / CONFIG_FILE)
    if config.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{folder} is not a lora-diffusion adapter ({CONFIG_FILE} has no format "
                        f"{ADAPTER_FORMAT!r})")
    return config


def save_adapter(folder, method: Method, backbone: Backbone, base_fingerprint: str, task, response_length: int,
                 max_length: int, train_summary: dict | None = None) -> dict:
    """Write a method's trained state and everything needed to use it again."""
    folder = Path(folder)
    config = {
        "format": ADAPTER_FORMAT, "version": 1,
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
    config = read_adapter_config(folder)
    model = DiffusionLM(base_for(config, base, where=f"adapter {folder}"))
    method = make_method(config["method"], config.get("options", {}))
    method.attach(model)
    method.load_state_dict(load_tensors(folder / TENSORS_FILE))
    model.eval()
    if merge and method.can_merge:
        method.merge()
    return model, method, config


def load_model(adapter=None, base=None) -> tuple[DiffusionLM, Method | None, dict | None]:
    """(model, method or None, adapter config or None): the base alone, or base + a saved adapter."""
    if adapter is None:
        return DiffusionLM(load_backbone(base)).eval(), None, None
    return load_adapter(adapter, base=base, merge=True)
