"""Files: safetensors for tensors, JSON for everything else, every write atomic.

A write goes to a temporary file in the same folder and is renamed over the target,
so a crash leaves either the old file or the new one, never half of one. Nothing
here unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and checkpoints are meant to be shared
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    _atomic_replace(Path(path), write)


def write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_replace(Path(path), write)


def write_figure(path, figure, png: bool = False) -> None:
    """A plotly figure as a self-contained HTML page (plotly.js embedded: opens offline).

    `png` also writes `path` with a .png suffix (for the README), through kaleido, which
    drives a local Chrome/Chromium: the `figures` extra, and BROWSER_PATH if the browser
    is not where kaleido looks (Debian's /usr/bin/chromium is tried).
    """
    write_text(path, figure.to_html(include_plotlyjs=True, full_html=True))
    if png:
        write_png(Path(path).with_suffix(".png"), figure)


def write_png(path, figure, width: int = 900, height: int = 500) -> None:
    """A static PNG of a plotly figure, written atomically."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise UserError("PNG figures need kaleido: pip install 'lora-diffusion[figures]'") from None
    if "BROWSER_PATH" not in os.environ and Path("/usr/bin/chromium").is_file():
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(figure.to_image(format="png", width=width, height=height, scale=1))
    except Exception as err:  # kaleido found no browser, or the browser failed
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not render {path.name}: {str(err).strip().splitlines()[0]} "
                        "(kaleido needs Chrome or Chromium; set BROWSER_PATH to it)") from None
    os.replace(tmp, path)


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a name -> tensor dict as safetensors (tied tensors are stored once per name)."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_replace(Path(path), lambda tmp: save_file(plain, tmp, metadata=meta))


def load_tensors(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a metrics log survives a kill)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the log
    return rows


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["write_json", "read_json", "save_tensors", "load_tensors", "append_jsonl",
           "read_jsonl", "tensor_bytes", "torch"]


# ---------------------------------------------------------------------------------------
# Adapter folders: adapter.safetensors (the method's state) + adapter_config.json
# ---------------------------------------------------------------------------------------

ADAPTER_FORMAT = "lora-diffusion-adapter"


def save_adapter(folder, method, backbone, base_fingerprint: str, task, response_length: int,
                 max_length: int, train_summary: dict | None = None) -> dict:
    """Write a method's trained state and everything needed to use it again."""
    folder = Path(folder)
    state = method.state_dict()
    config = {
        "format": ADAPTER_FORMAT, "version": 1,
        "method": method.name, "options": method.config(),
        "base": {"source": backbone.label, "fingerprint": base_fingerprint,
                 "hidden_size": backbone.hidden_size, "vocab_size": backbone.vocab_size},
        "task": {"name": task.name, "kind": task.kind, "labels": task.labels,
                 "instruction": task.train[0]["instruction"] if task.train else None, "source": task.source},
        "response_length": response_length, "max_length": max_length,
        "accounting": method.accounting(),
        "train": {k: v for k, v in (train_summary or {}).items() if k != "eval"},
    }
    save_tensors(folder / "adapter.safetensors", state, metadata={"format": ADAPTER_FORMAT})
    if hasattr(method, "save_peft"):  # weight LoRA / DoRA: also peft's own layout
        method.save_peft(folder / "peft")
    write_json(folder / "adapter_config.json", config)  # written last: a complete adapter has it
    return config


def load_adapter(folder, base=None, merge: bool = True):
    """(model, method, config) for a saved adapter; refuses a base with another fingerprint.

    `base` is a model folder, 'hf:NAME', an already loaded Backbone, or None for the base
    recorded in the adapter's config. A mergeable method is merged into the base for
    inference unless `merge` is False.
    """
    from .backbone import SHIPPED_BASE, Backbone, load_backbone
    from .diffusion import DiffusionLM
    from .methods import make_method

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"  # accept the run folder too
    config = read_json(folder / "adapter_config.json")
    if config.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{folder} is not a lora-diffusion adapter (adapter_config.json has no format "
                        f"{ADAPTER_FORMAT!r})")
    source = config["base"]["source"]
    if isinstance(base, Backbone):
        backbone = base
    else:
        backbone = load_backbone(base or (SHIPPED_BASE if source == "shipped" else source))
    found = backbone.fingerprint()
    if found != config["base"]["fingerprint"]:
        raise UserError(f"adapter {folder} was trained on a base with fingerprint "
                        f"{config['base']['fingerprint']}, but {backbone.source} has {found}; "
                        "load it with the base it was trained on (--base)")
    model = DiffusionLM(backbone)
    method = make_method(config["method"], **config.get("options", {}))
    method.attach(model)
    method.load_state_dict(load_tensors(folder / "adapter.safetensors"))
    model.eval()
    if merge and method.can_merge:
        method.merge()
    return model, method, config
