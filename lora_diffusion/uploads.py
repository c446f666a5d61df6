"""Adapter uploads: only the adapter's own files, each bounded while it is unpacked, then checked as a whole.

An upload comes from anyone. A zip's header can lie about sizes, so bytes are counted as
they are really unpacked; only the entries an exported adapter holds are taken; then the
adapter's config and tensors are checked and it is loaded on the app's base, so its tensors
must fit. Nothing is unpickled. An exported adapter also carries its run's held-out results
(`RESULTS_FILE`) and its training curve (`CURVE_FILE`); an upload's are checked to be this
adapter's (`check_results`) and plain numbers per step (`check_curve`). The workbench
runs offline: an adapter whose task names a hub dataset (or a path) is refused
(`offline_refusal`), since analysing it would load that task.
"""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
import zlib
from pathlib import Path

from .adapters import CONFIG_FILE, TENSORS_FILE, check_adapter, load_adapter
from .backbone import load_backbone
from .errors import UserError, quoted
from .files import atomic_write, load_tensors, read_json
from .metrics import metric_of

RESULTS_FILE = "results.json"    # a run's held-out results; an exported adapter carries them
CURVE_FILE = "metrics.jsonl"     # a run's training log (loss and monitor score per step): its curves, carried too
# What an adapter upload may hold: its own files, each with a size bound (JSON is small).
MAX_UPLOAD_BYTES = 200 * 2**20   # in total, unpacked
MAX_JSON_BYTES = 2**20
ADAPTER_ENTRIES = {TENSORS_FILE: MAX_UPLOAD_BYTES, CONFIG_FILE: MAX_JSON_BYTES,
                   "peft/adapter_model.safetensors": MAX_UPLOAD_BYTES, "peft/adapter_config.json": MAX_JSON_BYTES,
                   RESULTS_FILE: MAX_JSON_BYTES, CURVE_FILE: MAX_JSON_BYTES}
MAX_ENTRIES = 16                 # entries of an upload zip, folders included
_CHUNK = 2**20
NOT_A_ZIP = "the upload is not a valid zip file"
# What zipfile raises on a damaged or unusual archive (bad CRC or headers, encrypted entries,
# an unsupported compression, corrupt deflate data, a name that is not UTF-8): the upload's fault.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError, NotImplementedError, zlib.error,
               ValueError)
OFFLINE = "this workbench runs offline: adapters of hub tasks cannot be used here"


def offline_refusal(config: dict) -> str | None:
    """Why an adapter with this (checked) config cannot be used by the workbench, or None.

    Its task name is what the analyses load its data by: `hub:...` would reach the hub, or
    the disk where the name is a path, so such a name (or any with '/' or '\\') is refused.
    """
    name = config["task"]["name"]
    if name.startswith("hub:") or "/" in name or "\\" in name:
        return OFFLINE
    return None


def check_results(results, config: dict) -> None:
    """Held-out results an adapter carries (`RESULTS_FILE`): those of a run of its method on its task,
    with a score between 0 and 1, or the step the run was stopped at (a stopped run is not scored)."""
    if not isinstance(results, dict) or results.get("method") != config["method"] or \
            results.get("task") != config["task"]["name"]:
        raise UserError(f"{RESULTS_FILE} does not hold the held-out results of this adapter (its method and task)")
    if "stopped_at_step" in results:
        if not _whole(results["stopped_at_step"]):
            raise UserError(f"{RESULTS_FILE}: stopped_at_step must be a whole number")
    elif not is_score(results.get(metric_of(results))):
        raise UserError(f"{RESULTS_FILE}: {metric_of(results)} must be a number between 0 and 1")


MAX_CURVE_KEYS = 32  # values logged at one step (a run logs about ten)


def check_curve(text: str) -> list[dict]:
    """A training log an adapter carries (`CURVE_FILE`): one JSON object per line, each a whole `step`
    and plain numbers (or null) under short names; its records."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{CURVE_FILE} line {number} is not JSON") from None
        if not isinstance(record, dict) or not _whole(record.get("step")) or len(record) > MAX_CURVE_KEYS or \
                not all(len(k) <= 64 and (v is None or _number(v)) for k, v in record.items()):
            raise UserError(f"{CURVE_FILE} line {number} is not a step's numbers")
        records.append(record)
    return records


def _number(value) -> bool:  # NaN too: a run that diverged logs it
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_score(value) -> bool:
    """A held-out score as results hold it: a number between 0 and 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def extract_adapter_zip(archive: Path, target: Path) -> None:
    """The adapter's own entries of `archive` into `target`, each bounded while it is unpacked.

    A damaged archive is a UserError (`NOT_A_ZIP`), whatever part of zipfile notices it.
    """
    try:
        _extract(archive, target)
    except _ZIP_ERRORS:
        raise UserError(NOT_A_ZIP) from None
    except OSError as e:  # a seek to a header offset that makes no sense
        if e.errno != errno.EINVAL:
            raise
        raise UserError(NOT_A_ZIP) from None


def _extract(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        if len(members) > MAX_ENTRIES:
            raise UserError(f"the zip holds {len(members)} entries; an adapter zip holds at most "
                            f"{len(ADAPTER_ENTRIES)} files")
        files = [m for m in members if not m.is_dir()]
        names = [m.filename for m in files]
        for name in names:
            if name not in ADAPTER_ENTRIES:
                raise UserError(f"the zip holds {quoted(name, 60)}; an adapter zip holds only "
                                f"{', '.join(ADAPTER_ENTRIES)}")
        if len(set(names)) != len(names):
            raise UserError("the zip holds the same file twice")
        total = 0
        for m in files:
            total += _unpack(z, m, target / m.filename, ADAPTER_ENTRIES[m.filename], MAX_UPLOAD_BYTES - total)


def _unpack(z: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path, cap: int, left: int) -> int:
    """Copy one entry in chunks, refusing it as soon as it passes its cap or the total left; its size."""
    def write(tmp):
        written = 0
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > cap:
                    raise UserError(f"{member.filename} unpacks to more than {cap // 2**20 or 1} MB")
                if written > left:
                    raise UserError(f"the zip unpacks to more than {MAX_UPLOAD_BYTES // 2**20} MB")
                out.write(chunk)
        sizes.append(written)

    sizes: list[int] = []
    atomic_write(path, write)
    return sizes[0]


def copy_adapter_files(paths: list[Path], target: Path) -> None:
    """adapter.safetensors and adapter_config.json uploaded as two files (an upload prefix allowed)."""
    for p in paths:
        kind = next((f for f in (TENSORS_FILE, CONFIG_FILE) if p.name == f or p.name.endswith("_" + f)), None)
        if kind is None:
            raise UserError(f"{quoted(p.name, 60)}: upload {TENSORS_FILE} and {CONFIG_FILE}, "
                            "or the zip the workbench exports")
        if p.stat().st_size > ADAPTER_ENTRIES[kind]:
            raise UserError(f"{kind} is larger than {ADAPTER_ENTRIES[kind] // 2**20} MB")
        atomic_write(target / kind, lambda tmp, p=p: shutil.copyfile(p, tmp))


def check_whole_adapter(target: Path, base) -> None:
    """Both files there, the config and tensors valid, and the adapter loads on `base` (so shapes fit)."""
    for needed in (TENSORS_FILE, CONFIG_FILE):
        if not (target / needed).is_file():
            raise UserError(f"the upload has no {needed}")
    peft = [e for e in ADAPTER_ENTRIES if e.startswith("peft/")]
    if any((target / e).is_file() for e in peft) and not all((target / e).is_file() for e in peft):
        raise UserError(f"the upload's peft/ folder needs both {' and '.join(peft)}")
    config = check_adapter(target)[0]
    refusal = offline_refusal(config)
    if refusal:
        raise UserError(refusal)
    if (target / RESULTS_FILE).is_file():
        check_results(read_json(target / RESULTS_FILE), config)
    if (target / CURVE_FILE).is_file():
        try:
            check_curve((target / CURVE_FILE).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{CURVE_FILE} is not UTF-8 text") from None
    if (target / peft[0]).is_file():
        load_tensors(target / peft[0])  # peft's copy of the weights: safetensors too
    # Loaded on a Backbone we pass, never on the base its config names: that could be any path.
    try:
        load_adapter(target, base=load_backbone(base), merge=False)
    except UserError:
        raise
    except Exception as e:  # a tensor that fits nowhere fails inside the method as whatever torch raises
        raise UserError(f"the adapter does not load on this workbench's base ({type(e).__name__})") from None
