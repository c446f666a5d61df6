"""The app's workspace: a folder of runs, a queue of training jobs, adapters in and out.

A `Workspace` is a folder of runs. `start_training` fine-tunes in a background thread
(one at a time per workspace; later ones wait their turn) and keeps every log record, so
a page can poll it for a live loss curve; `TrainJob.stop` ends training at the next step
and the adapter trained so far is evaluated and saved like any finished run. Adapters
come in and go out as zip files holding safetensors + JSON only. A router over the
workspace's LoRA-Diffusion adapters is trained once per set and kept.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import CONFIG_FILE, RUN_ADAPTER, TENSORS_FILE, read_adapter_config
from .backbone import load_backbone
from .errors import UserError
from .files import atomic_write, load_tensors, read_json, write_json, write_text
from .methods import make_method
from .metrics import metric_of, score
from .router import Composition, trained_composition
from .runs import fine_tune
from .training import TrainConfig

ADAPTER_FILES = (TENSORS_FILE, CONFIG_FILE)
MAX_UPLOAD_BYTES = 200 * 2**20


@dataclass
class TrainJob:
    """One fine-tuning run in a background thread."""

    id: str
    folder: Path
    spec: dict
    status: str = "queued"           # queued, running, done, stopped, failed
    records: list = field(default_factory=list)
    result: dict | None = None
    error: str | None = None
    started: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (or `timeout`); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "failed")

    @property
    def step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)

    def monitor(self) -> list[dict]:
        """The periodic held-out scores logged during training (step + eval_monitor_* keys)."""
        return [r for r in self.records if any(k.startswith("eval_monitor_") for k in r)]


class Workspace:
    """A folder of training runs and imported adapters."""

    def __init__(self, root, max_running: int = 1):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, TrainJob] = {}
        self._slots = threading.Semaphore(max_running)
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._compositions: dict = {}  # trained routers, by folder

    def _new_folder(self, stem: str) -> tuple[str, Path]:
        with self._lock:  # unique per call, whichever user asks
            while True:
                run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):03d}-{stem}"
                folder = self.root / run_id
                if not folder.exists():
                    folder.mkdir(parents=True)
                    return run_id, folder

    # ---- training -------------------------------------------------------------------

    def start_training(self, task, method: str, options: dict | None = None, config=None, base=None,
                       sampler_steps: int = 16, monitor_examples: int = 64) -> TrainJob:
        """Fine-tune `method` on `task` (a data.Task) in a background thread; returns the job."""
        config = config or TrainConfig()
        method_obj = make_method(method, options)  # bad options fail here, in the caller
        run_id, folder = self._new_folder(f"{method}-{task.name}")
        spec = {"task": task.name, "method": method, "options": method_obj.options(), "steps": config.steps,
                "batch_size": config.batch_size, "lr": config.lr or method_obj.default_lr, "seed": config.seed,
                "base": str(base or "shipped"), "n_train": len(task.train), "n_eval": len(task.eval)}
        write_json(folder / "job.json", spec)
        job = TrainJob(run_id, folder, spec)
        job._thread = threading.Thread(target=self._run, name=f"train-{run_id}", daemon=True,
                                       args=(job, task, method_obj, config, base, sampler_steps, monitor_examples))
        self.jobs[run_id] = job
        job._thread.start()
        return job

    def _run(self, job, task, method, config, base, sampler_steps, monitor_examples) -> None:
        with self._slots:
            if job._stop.is_set():
                job.status = "stopped"
                return
            job.status, job.started = "running", time.time()
            try:
                backbone = load_backbone(base)
                result = fine_tune(backbone, task, method, config, out_dir=job.folder, truncate=True,
                                   sampler_steps=sampler_steps, monitor_examples=monitor_examples,
                                   on_log=job.records.append, should_stop=job._stop.is_set, progress=False)
                result.pop("model", None)
                job.result = result
                job.status = "stopped" if job._stop.is_set() else "done"
            except UserError as e:
                job.error, job.status = str(e), "failed"
            except Exception as e:  # keep the details on disk, show one line
                write_text(job.folder / "error.log", traceback.format_exc())
                job.error = f"training failed: {type(e).__name__}: {e} (details in {job.folder / 'error.log'})"
                job.status = "failed"

    # ---- adapters -------------------------------------------------------------------

    def adapters(self) -> list[dict]:
        """Every complete adapter in the workspace, newest first."""
        found = []
        for config_path in self.root.glob(f"*/{RUN_ADAPTER}/{CONFIG_FILE}"):
            run = config_path.parent.parent
            config = read_json(config_path)
            results = read_json(run / "results.json") if (run / "results.json").is_file() else {}
            found.append({"name": run.name, "path": str(config_path.parent), "method": config["method"],
                          "task": config["task"]["name"], "metric": metric_of(results) if results else None,
                          "score": score(results) if results else None,
                          "trainable_parameters": config["accounting"]["trainable_parameters"]})
        return sorted(found, key=lambda a: a["name"], reverse=True)

    def adapter_path(self, name: str) -> Path:
        path = self.root / name / RUN_ADAPTER
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"no adapter named {name!r} in this workspace")
        return path

    def export_adapter(self, name: str) -> Path:
        """A zip of the adapter's safetensors + JSON (what `import_adapter` takes back)."""
        folder = self.adapter_path(name)
        target = self.root / name / f"{name}.zip"

        def write(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and path.suffix in (".safetensors", ".json"):
                        z.write(path, path.relative_to(folder))
        atomic_write(target, write)
        return target

    def import_adapter(self, path) -> str:
        """Add an adapter from a zip (as exported) or from its two files; returns its name.

        Only .safetensors and .json members are read; the config must be a lora-diffusion
        adapter config and the tensors must load as safetensors (nothing is unpickled).
        A refused upload leaves nothing behind.
        """
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        for p in paths:
            if p.stat().st_size > MAX_UPLOAD_BYTES:
                raise UserError(f"{p.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        run_id, folder = self._new_folder("imported")
        target = folder / RUN_ADAPTER
        target.mkdir()
        try:
            if len(paths) == 1 and paths[0].suffix == ".zip":
                _extract_adapter_zip(paths[0], target)
            else:
                _copy_adapter_files(paths, target)
            _check_adapter_files(target)
        except (UserError, zipfile.BadZipFile) as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(str(e) if isinstance(e, UserError) else "the upload is not a valid zip file") from None
        return run_id

    # ---- composition ----------------------------------------------------------------

    def composition(self, names: list[str], data_dir=None, router_steps: int = 150, base=None):
        """A router over the named LoRA-Diffusion adapters (one per task), trained once and kept.

        The trained router is saved under `compositions/` (safetensors + JSON), keyed by the
        adapters, so a second request for the same set loads it instead of training again.
        """
        if len(names) < 2:
            raise UserError("pick at least two LoRA-Diffusion adapters, one per task, to compose")
        key = hashlib.sha1("|".join(sorted(names)).encode()).hexdigest()[:12]
        folder = self.root / "compositions" / f"{key}-{router_steps}"
        with self._lock:
            cached = self._compositions.get(folder)
        if cached is not None:
            return cached
        paths = [self.adapter_path(n) for n in sorted(names)]
        if (folder / "composition.json").is_file():
            composition = Composition.load(folder, base=base)
        else:
            composition = trained_composition(paths, base, data_dir, max_train=2000, max_eval=1,
                                              router_steps=router_steps, progress=False)[0]
            composition.save(folder)
        composition.use(None)
        composition.model.eval()
        with self._lock:
            self._compositions[folder] = composition
        return composition


def _extract_adapter_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_UPLOAD_BYTES:
            raise UserError(f"the zip unpacks to more than {MAX_UPLOAD_BYTES // 2**20} MB")
        for m in members:
            name = Path(m.filename)
            if name.is_absolute() or ".." in name.parts or name.suffix not in (".safetensors", ".json"):
                raise UserError(f"the zip holds {m.filename!r}; only .safetensors and .json files "
                                "inside the adapter folder are accepted")
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(z.read(m))


def _copy_adapter_files(paths: list[Path], target: Path) -> None:
    """adapter.safetensors and adapter_config.json uploaded as two files (an upload prefix allowed)."""
    for p in paths:
        if p.name.split("_", 1)[-1] not in ADAPTER_FILES and p.name not in ADAPTER_FILES:
            raise UserError(f"{p.name}: upload {TENSORS_FILE} and {CONFIG_FILE}, or the zip the workbench exports")
        shutil.copyfile(p, target / (TENSORS_FILE if p.suffix == ".safetensors" else CONFIG_FILE))


def _check_adapter_files(target: Path) -> None:
    for needed in ADAPTER_FILES:
        if not (target / needed).is_file():
            raise UserError(f"the upload has no {needed}")
    read_adapter_config(target)
    try:
        load_tensors(target / TENSORS_FILE)
    except UserError:
        raise UserError(f"{TENSORS_FILE} does not load as safetensors") from None
