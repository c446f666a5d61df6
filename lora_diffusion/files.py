"""Files: safetensors for tensors, JSON for everything else, every write atomic.

A write goes to a temporary file in the same folder and is renamed over the target, so a
crash leaves either the old file or the new one, never half of one. Nothing here
unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and checkpoints are meant to be shared
    try:
        write(tmp)
        _fsync(tmp)  # on disk before the rename makes it the file: a power cut leaves old or new
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


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
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=meta))


def load_tensors(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None


def tensor_bytes(tensors: dict) -> int:
    """Bytes of the tensors' data: a safetensors file's size minus its header."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line and flush it to disk (a metrics log survives a kill)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL log; a last line cut by a crash ends it."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def write_jsonl(path, records: list[dict]) -> None:
    """Replace a JSONL log with `records`, atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
