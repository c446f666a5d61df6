"""The app's workspace: folders of runs per user, training jobs in them, adapters in and out.

A `Workspace` is a folder of runs. The app keeps one root workspace W and gives every browser
user their own, `W.user(id)` at W/users/<id>/; adapters the operator puts in W/shared/ are
offered to everyone, read-only, as `shared:<name>`. All the workspaces of one root share one
`JobQueue`: first come, first served, with a position to show while a job waits; and one
`Compositions`, the trained routers kept in memory (each holds a model: two in all).

Everything that comes from a page or the API is checked here, at the library's edge: an
adapter name is a plain folder name among this workspace's adapters (`plain_name`), a job
is looked up among this workspace's jobs only, and an upload goes through `uploads.py`
(bounded, the adapter's own files only, checked as a whole); a refused upload leaves
nothing behind. The workbench runs offline: an adapter whose task is a hub dataset (or a
path) is refused wherever it is, at import and in the lists (`uploads.offline_refusal`), and
what loads an adapter's task by name (analyses, routers) takes only tasks the workbench can
load itself (`LOADABLE_TASKS`). Download zips are written to the temp folder (`EXPORTS`),
where gradio serves files from, never into the workspace.
Messages name files relative to the workspace (`public_message`), never by server path.

`start_training` fine-tunes in a background thread within `JobLimits`; `TrainJob.stop`
works at every stage: a queued job never starts, a running one ends at the next step, keeps
its adapter but is not scored (it is marked stopped at step N, so it never passes for a
finished run), and one stopped in its final evaluation ends at once without keeping its adapter.
`delete_adapter` and `reset` remove a user's own runs, never a shared adapter.
`adapters` lists the runs side by side (method, task, steps, time, score), `curve` gives a run's
logged curve, `decoding` how an adapter decodes (its instruction, length and sampler steps), and
`routers` / `router` the routers this workspace trained and saved. An exported run is one zip:
its adapter, held-out results and curve; `export_figures` writes figures for download.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import traceback
import zipfile
from collections import OrderedDict
from pathlib import Path

from .adapters import CONFIG_FILE, RUN_ADAPTER, TENSORS_FILE, check_adapter, task_instruction
from .backbone import load_backbone
from .data import BUILTIN, SUITE_TASKS
from .errors import UserError, quoted
from .files import atomic_write, read_json, write_json, write_text
from .jobs import STOPPED_FILE, JobLimits, JobQueue, StoppedInEvaluation, TrainJob
from .methods import make_method
from .metrics import metric_of
from .router import Composition, trained_composition
from .runs import fine_tune
from .training import TrainConfig
from .uploads import (ADAPTER_ENTRIES, CURVE_FILE, MAX_JSON_BYTES, MAX_UPLOAD_BYTES, OFFLINE, RESULTS_FILE, check_curve,
                      check_results, check_whole_adapter, copy_adapter_files, extract_adapter_zip, is_score,
                      offline_refusal)

SHARED = "shared:"          # the prefix of an adapter from the root's shared/ folder
ROUTER = "router:"          # the prefix of a saved router of the workspace (its folder under compositions/)
MAX_NAME = 128              # characters of an adapter name, a user id or a job id
MIN_USER_ID = 8
LOADABLE_TASKS = tuple(SUITE_TASKS) + tuple(BUILTIN)  # what load_task loads by name alone (shipped, or --data-dir)
EXPORTS = "lora-diffusion-exports"  # download zips: <temp folder>/EXPORTS/<a hash of the workspace>/<name>.zip
EXPORT_HOURS = 1            # a download zip is removed after that (gradio has its own copy by then)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RUN_COUNTER = itertools.count()  # one for the process: run ids differ across users' workspaces too


def plain_name(name, what: str = "adapter name", hint: str = "pick one from the list") -> str:
    """`name` if it is a plain folder name, as the workbench makes them; else a UserError.

    Names come from pages and API calls, that is from anyone: no '/', '\\', '..', NUL or
    absolute path, and a bounded length. The message never repeats a refused name.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"no {what} given: {hint}")
    if len(name) > MAX_NAME or ".." in name or not _PLAIN.fullmatch(name):
        raise UserError(f"that is not a valid {what}: {hint}")
    return name


_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/[^\s'\"/]+(?:/[^\s'\"/]*)*")


def public_message(text: str, *roots) -> str:
    """`text` without server paths: paths under `roots` relative to them, any other absolute path by its name."""
    for root in roots:
        if root is not None:
            for form in {str(Path(root)), str(Path(root).resolve())}:
                text = text.replace(form + "/", "").replace(form, ".")
    return _ABSOLUTE.sub(lambda m: m.group(0).rstrip("/").rpartition("/")[2] or "/", text)


class Compositions:
    """Trained routers kept in memory, by folder, shared by every workspace of one root.

    Each holds a model, so only the `size` used last are kept, whichever users they are of.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._lock = threading.Lock()
        self._kept: OrderedDict = OrderedDict()

    def get(self, key):
        with self._lock:
            value = self._kept.get(key)
            if value is not None:
                self._kept.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._kept[key] = value
            self._kept.move_to_end(key)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def discard(self, key) -> None:
        with self._lock:
            self._kept.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)


class Workspace:
    """A folder of training runs and imported adapters (created when something is written)."""

    def __init__(self, root, max_running: int = 1, limits: JobLimits | None = None, shared=None,
                 queue: JobQueue | None = None, compositions: Compositions | None = None):
        self.root = Path(root)
        self.limits = limits or JobLimits()
        self.shared = Path(shared) if shared is not None else None  # a folder of read-only adapters
        self.queue = queue or JobQueue(max_running, self.limits.waiting)
        self.compositions = compositions if compositions is not None else Compositions()
        self.jobs: dict[str, TrainJob] = {}
        self.broken: list[dict] = []  # adapter folders the last listing skipped: name, reason
        self._lock = threading.Lock()
        self._checked: dict[Path, tuple] = {}  # adapter folder -> (file stamps, config or refusal)
        self._users: OrderedDict[str, Workspace] = OrderedDict()

    # ---- users ----------------------------------------------------------------------

    def user(self, user_id) -> "Workspace":
        """The workspace of one browser user, W/users/<id>/, sharing this root's queue, routers and shared/ adapters.

        The id separates users' folders; it is not authentication (an API caller picks it).
        """
        user_id = plain_name(user_id, "user id", "reload the page")
        if len(user_id) < MIN_USER_ID:  # the id is all that separates users: not one anyone would guess
            raise UserError(f"a user id has at least {MIN_USER_ID} characters: reload the page")
        with self._lock:
            ws = self._users.pop(user_id, None) or Workspace(
                self.root / "users" / user_id, limits=self.limits, shared=self.root / "shared", queue=self.queue,
                compositions=self.compositions)
            self._users[user_id] = ws
            # Forget the least recent users beyond a few hundred (their folders stay), but never
            # one with a job still queued or running: its page polls it.
            for old in list(self._users)[:-256]:
                if not any(not j.finished for j in self._users[old].jobs.values()):
                    del self._users[old]
        return ws

    def public(self, text: str) -> str:
        return public_message(text, self.root, self.shared)

    def _new_folder(self, stem: str) -> tuple[str, Path]:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:60] or "run"  # CSV names are anyone's
        with self._lock:  # unique per call, whichever user asks
            while True:
                run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_RUN_COUNTER):03d}-{stem}"
                folder = self.root / run_id
                if not folder.exists():
                    folder.mkdir(parents=True)
                    return run_id, folder

    # ---- training -------------------------------------------------------------------

    def start_training(self, task, method: str, options: dict | None = None, config=None, base=None,
                       sampler_steps: int = 16, monitor_examples: int = 64) -> TrainJob:
        """Fine-tune `method` on `task` (a data.Task) in a background thread; returns the job."""
        config = config or TrainConfig()
        self._check_limits(config)
        method_obj = make_method(method, options)  # bad options fail here, in the caller
        run_id, folder = self._new_folder(f"{method}-{task.name}")
        spec = {"task": task.name, "method": method, "options": method_obj.options(), "steps": config.steps,
                "batch_size": config.batch_size, "lr": config.lr or method_obj.default_lr, "seed": config.seed,
                "base": str(base or "shipped"), "n_train": len(task.train), "n_eval": len(task.eval)}
        write_json(folder / "job.json", spec)
        job = TrainJob(run_id, folder, spec, queue=self.queue)
        try:
            self.queue.join(job)
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job._thread = threading.Thread(target=self._run, name=f"train-{run_id}", daemon=True,
                                       args=(job, task, method_obj, config, base, sampler_steps, monitor_examples))
        self.jobs[run_id] = job
        job._thread.start()
        return job

    def _check_limits(self, config: TrainConfig) -> None:
        limits = self.limits
        if not 1 <= config.steps <= limits.steps:
            raise UserError(f"steps must be between 1 and {limits.steps:,} here")
        if not 1 <= config.batch_size <= limits.batch_size:
            raise UserError(f"the batch size must be between 1 and {limits.batch_size} here")
        if sum(not j.finished for j in self.jobs.values()) >= limits.jobs_per_user:
            raise UserError(f"you have {limits.jobs_per_user} training jobs queued or running; "
                            "wait for one to end, or stop one")

    def job(self, job_id) -> TrainJob:
        """One of this workspace's jobs (another user's job ids are not found here)."""
        job = self.jobs.get(plain_name(job_id, "job id"))
        if job is None:
            raise UserError("no training job of yours has that id")
        return job

    def _run(self, job, task, method, config, base, sampler_steps, monitor_examples) -> None:
        if not self.queue.wait_turn(job):
            shutil.rmtree(job.folder, ignore_errors=True)  # it holds only the job's spec
            job.status, job.note = "stopped", "stopped while queued: nothing was trained"
            return
        job.status, job.started = "running", time.time()
        try:
            job.result = self._train(job, task, method, config, base, sampler_steps, monitor_examples)
            job.status = "stopped" if job.stopped else "done"
        except StoppedInEvaluation:
            shutil.rmtree(job.folder / RUN_ADAPTER, ignore_errors=True)
            job.status, job.note = "stopped", "stopped during the final evaluation: the adapter was not kept"
        except UserError as e:
            job.error, job.status = self.public(str(e)), "failed"
        except Exception as e:  # keep the details on disk, show one line
            write_text(job.folder / "error.log", traceback.format_exc())
            job.error = (f"training failed: {type(e).__name__}: {self.public(str(e))} "
                         f"(details in {job.id}/error.log on the server)")
            job.status = "failed"
        finally:
            self.queue.leave()

    def _train(self, job, task, method, config, base, sampler_steps, monitor_examples) -> dict:
        """fine_tune with the job's stop and time limit wired in; a stopped run is saved but not scored."""
        steps_done = itertools.count()

        def should_stop() -> bool:
            done = next(steps_done)  # called once before each step
            limit = self.limits.seconds
            if limit and time.time() - job.started > limit:
                job.stop(f"stopped by the {limit / 60:g}-minute limit per job")
            if not job.stop_requested:
                return False
            if job.stopped is None:  # seen for the first time
                job.stopped = {"step": done, "reason": job._reason}
                job.note = f"{job._reason} at step {done}: the adapter is kept, not scored on the held-out split"
                write_json(job.folder / STOPPED_FILE, job.stopped)  # before the adapter: never listed as done
            return True

        def on_log(record: dict) -> None:
            job.records.append(record)
            if "loss" in record and record["step"] >= config.steps:
                job.status = "evaluating"

        def cut_evaluation(module, args) -> None:  # the LM head runs in every denoiser call
            if job.status == "evaluating" and job.stop_requested:
                raise StoppedInEvaluation

        backbone = load_backbone(base)
        hook = backbone.head.register_forward_pre_hook(cut_evaluation)
        try:
            result = fine_tune(backbone, task, method, config, out_dir=job.folder, truncate=True,
                               sampler_steps=sampler_steps, monitor_examples=monitor_examples,
                               on_log=on_log, should_stop=should_stop, progress=False, score_if_stopped=False)
        finally:
            hook.remove()
        result.pop("model", None)
        return result

    # ---- adapters -------------------------------------------------------------------

    def _roots(self, include_shared: bool) -> list[tuple[str, Path]]:
        roots = [("", self.root)]
        if include_shared and self.shared is not None:
            roots.append((SHARED, self.shared))
        return roots

    def adapters(self, include_shared: bool = False) -> list[dict]:
        """Every complete, valid adapter in the workspace (and shared/, if asked), newest first.

        A folder whose adapter does not validate is skipped and listed in `self.broken`
        (name and reason), so one bad folder never takes the list down.
        """
        found, broken = [], []
        for prefix, root in self._roots(include_shared):
            if not root.is_dir():
                continue
            for config_path in root.glob(f"*/{RUN_ADAPTER}/{CONFIG_FILE}"):
                run = config_path.parent.parent
                name = prefix + run.name
                try:
                    found.append(self._entry(name, run, shared=bool(prefix)))
                except UserError as e:
                    broken.append({"name": name if _PLAIN.fullmatch(run.name) else "(a folder with an odd name)",
                                   "reason": self.public(str(e))})
        self.broken = broken
        return sorted(found, key=lambda a: (not a["shared"], a["name"]), reverse=True)  # own ones first

    def _entry(self, name: str, run: Path, shared: bool) -> dict:
        plain_name(run.name)
        config = self._valid_config(run / RUN_ADAPTER)
        trained = _optional_json(run / RESULTS_FILE)  # a run of this workspace; an import carries its own
        results = trained or _optional_json(run / RUN_ADAPTER / RESULTS_FILE) or {}
        stopped_at = (_optional_json(run / STOPPED_FILE) or {}).get("step", results.get("stopped_at_step"))
        metric, value = metric_of(results), results.get(metric_of(results))
        if stopped_at is not None or not is_score(value):  # a stopped run is not scored
            metric, value = None, None
        if stopped_at is not None:
            status = f"stopped at step {stopped_at}"
        else:
            status = "shared" if shared else ("done" if trained else "imported")
        train = config.get("train") or {}  # what the run did: an adapter of an older version may not say
        return {"name": name, "path": str(run / RUN_ADAPTER), "method": config["method"],
                "task": config["task"]["name"], "metric": metric, "score": value, "status": status,
                "shared": shared, "trainable_parameters": config["accounting"]["trainable_parameters"],
                "steps": stopped_at if stopped_at is not None else train.get("steps"),
                "train_seconds": train.get("train_seconds")}

    def _valid_config(self, folder: Path) -> dict:
        """The adapter's config if the adapter checks out as a whole and the workbench may use it (see
        `uploads.offline_refusal`); cached while its files are unchanged."""
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                      for p in (folder / CONFIG_FILE, folder / TENSORS_FILE))
        cached = self._checked.get(folder)
        if cached is None or cached[0] != stamp:
            try:
                config = check_adapter(folder)[0]
                refusal = offline_refusal(config)
                cached = (stamp, UserError(refusal) if refusal else config)
            except UserError as e:
                cached = (stamp, e)
            self._checked[folder] = cached
        if isinstance(cached[1], UserError):
            raise cached[1]
        return cached[1]

    def adapter_path(self, name, needs_task: bool = False) -> Path:
        """The folder of adapter `name`: one of this workspace's (or, as `shared:NAME`, of shared/) that validates.

        `needs_task`: the caller loads the adapter's task by name (an analysis, a router), so it
        must be one of LOADABLE_TASKS, not a CSV that was uploaded to train it.
        """
        shared = isinstance(name, str) and name.startswith(SHARED)
        folder = plain_name(name[len(SHARED):] if shared else name)
        root = self.shared if shared else self.root
        path = root / folder / RUN_ADAPTER if root is not None else None
        if path is None or not (path / CONFIG_FILE).is_file() or not path.resolve().is_relative_to(root.resolve()):
            where = "among the shared adapters" if shared else "in your workspace"
            raise UserError(f"no adapter named {name!r} {where}")
        try:
            config = self._valid_config(path)
        except UserError as e:
            if str(e) == OFFLINE:
                raise UserError(f"adapter {name!r} cannot be used: {OFFLINE}") from None
            raise UserError(f"adapter {name!r} is broken: {self.public(str(e))}") from None
        task = config["task"]["name"]
        if needs_task and task not in LOADABLE_TASKS:
            raise UserError(f"adapter {name!r} was trained on {quoted(task, 60)}, a CSV file the workbench "
                            f"does not keep; this needs adapters of one of: {', '.join(LOADABLE_TASKS)}")
        return path

    def curve(self, name) -> list[dict]:
        """The logged curve of adapter `name`'s run (its own log, or the one an import carried): one record
        per logged step (loss, held-out monitor score); [] where there is none or it does not check out."""
        folder = self.adapter_path(name)
        for path in (folder.parent / CURVE_FILE, folder / CURVE_FILE):
            if path.is_file():
                try:
                    return check_curve(path.read_text(encoding="utf-8"))
                except (UserError, UnicodeDecodeError):
                    return []
        return []

    def decoding(self, name) -> dict:
        """How adapter `name` decodes as it was trained: its task's instruction, its response length, and
        the sampler steps it was scored with (at most one per answer position; the length where unrecorded)."""
        folder = self.adapter_path(name)
        config = self._valid_config(folder)
        length = int(config["response_length"])
        results = _optional_json(folder.parent / RESULTS_FILE) or _optional_json(folder / RESULTS_FILE) or {}
        scored = results.get("steps")
        steps = scored if isinstance(scored, int) and not isinstance(scored, bool) and scored > 0 else length
        return {"instruction": task_instruction(config), "response_length": length,
                "sampler_steps": min(steps, length)}

    def routers(self) -> dict[str, str]:
        """The routers this workspace trained and saved (`composition`): `router:<folder>` -> what it mixes."""
        found = {}
        folder = self.root / "compositions"
        for spec in sorted(folder.glob("*/composition.json")) if folder.is_dir() else []:
            saved = _optional_json(spec) or {}
            labels, adapters = saved.get("labels"), saved.get("adapters")
            if _PLAIN.fullmatch(spec.parent.name) and isinstance(labels, list) and isinstance(adapters, list) and \
                    all(isinstance(x, str) for x in labels + adapters) and \
                    all(Path(a).is_dir() for a in adapters):  # an adapter it mixes was deleted: not offered
                found[ROUTER + spec.parent.name] = "router over " + ", ".join(labels)
        return found

    def router(self, name, base=None) -> Composition:
        """A saved router of this workspace by its `routers` name, loaded once and kept (`Compositions`)."""
        if not isinstance(name, str) or not name.startswith(ROUTER):
            raise UserError("no such router: pick one from the list")
        folder = self.root / "compositions" / plain_name(name[len(ROUTER):], "router name")
        if not (folder / "composition.json").is_file():
            raise UserError("no such router in your workspace: compose one in the Generate tab first")
        composition = self.compositions.get(folder)
        if composition is None:
            composition = Composition.load(folder, base=base)
            composition.model.eval()
            self.compositions.put(folder, composition)
        composition.use(None)
        return composition

    def export_adapter(self, name) -> Path:
        """A zip of the adapter's own files, its held-out results and its curve (what `import_adapter`
        takes back), in this workspace's export folder: a finished run as one file.

        That folder is in the temp folder (see `exports`), which gradio serves files from
        wherever the workspace is; zips older than EXPORT_HOURS are removed on the way.
        """
        folder = self.adapter_path(name)
        results = self._results_to_export(folder)
        curve = self._curve_to_export(folder)
        exports = self.exports()
        _remove_old(exports.glob("*.zip"))
        target = exports / f"{folder.parent.name}.zip"

        def write(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for entry in ADAPTER_ENTRIES:
                    if (folder / entry).is_file() and entry not in (RESULTS_FILE, CURVE_FILE):
                        z.write(folder / entry, entry)
                if results is not None:
                    z.write(results, RESULTS_FILE)
                if curve is not None:
                    z.write(curve, CURVE_FILE)
        atomic_write(target, write)
        return target

    def _results_to_export(self, folder: Path) -> Path | None:
        """The held-out results of the adapter in `folder` (its run's, or those an import carried), if an
        upload of them would be taken back (`check_results`)."""
        for path in (folder.parent / RESULTS_FILE, folder / RESULTS_FILE):
            results = _optional_json(path)
            if results is not None:
                if (folder.parent / STOPPED_FILE).is_file() and "stopped_at_step" not in results:
                    return None  # an older app's stopped run: scored on a slice only
                try:
                    check_results(results, self._valid_config(folder))
                    return path
                except UserError:
                    return None
        return None

    def _curve_to_export(self, folder: Path) -> Path | None:
        """The run's logged curve (or the one an import carried), if an upload of it would be taken back."""
        for path in (folder.parent / CURVE_FILE, folder / CURVE_FILE):
            if path.is_file():
                try:
                    if path.stat().st_size <= MAX_JSON_BYTES:
                        check_curve(path.read_text(encoding="utf-8"))
                        return path
                except (UserError, UnicodeDecodeError):
                    pass
                return None
        return None

    def export_figures(self, figures: dict, png: bool = False) -> tuple[list[Path], str]:
        """Figures (file stem -> plotly figure) as self-contained HTML pages, and PNGs if asked, in this
        workspace's export folder (gradio serves files from there); returns the files and what could not be
        written (a PNG needs kaleido and a browser: `plots.write_png`), '' if nothing."""
        from .plots import write_figure, write_png  # plotly only when figures are asked for

        folder = self.exports() / "figures"
        folder.mkdir(mode=0o700, exist_ok=True)
        _remove_old(folder.glob("*"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        written, note = [], ""
        for stem, figure in figures.items():
            path = folder / f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]+', '-', stem).strip('-.')[:60] or 'figure'}.html"
            write_figure(path, figure)
            written.append(path)
            if png and not note:
                try:
                    write_png(path.with_suffix(".png"), figure)
                    written.append(path.with_suffix(".png"))
                except UserError as e:
                    note = f"HTML only: {self.public(str(e))}"
        return written, note

    def exports(self) -> Path:
        """<temp folder>/EXPORTS/<hash of this workspace's folder>/: one per workspace, so one per user."""
        top = Path(tempfile.gettempdir()) / EXPORTS
        top.mkdir(mode=0o700, exist_ok=True)
        info = top.lstat()  # the temp folder is everyone's: the folder must be ours, not a link
        if stat.S_ISLNK(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            raise RuntimeError(f"{top} belongs to another user of this machine; remove it or set TMPDIR")
        folder = top / hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:20]
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def import_adapter(self, path, base=None) -> str:
        """Add an adapter from a zip (as exported) or from its two files; returns its name.

        Only the adapter's own files are taken (see ADAPTER_ENTRIES), each bounded while it is
        unpacked; then the adapter is checked as a whole and loaded on `base` (the app's base),
        so its tensors must fit. Nothing is unpickled. A refused upload leaves nothing behind.
        """
        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        if not 1 <= len(paths) <= 2:
            raise UserError(f"upload the adapter zip, or {TENSORS_FILE} and {CONFIG_FILE}")
        for p in paths:
            if not p.is_file():
                raise UserError("the upload is missing; upload it again")
            if p.stat().st_size > MAX_UPLOAD_BYTES:
                raise UserError(f"{quoted(p.name, 60)} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        run_id, folder = self._new_folder("imported")
        target = folder / RUN_ADAPTER
        try:
            if len(paths) == 1 and paths[0].suffix == ".zip":
                extract_adapter_zip(paths[0], target)
            else:
                copy_adapter_files(paths, target)
            check_whole_adapter(target, base)
        except BaseException as e:  # a damaged zip is a UserError too (uploads.extract_adapter_zip)
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, UserError):
                raise UserError(self.public(str(e))) from None
            raise
        return run_id

    # ---- removing -------------------------------------------------------------------

    def delete_adapter(self, name) -> None:
        """Remove one of this workspace's own adapters with its whole run folder (never a shared one),
        and the saved routers that mix it (they could no longer load)."""
        if isinstance(name, str) and name.startswith(SHARED):
            raise UserError("shared adapters are read-only: only whoever runs the workbench can remove them")
        run = self.root / plain_name(name)
        if run.is_symlink() or not (run / RUN_ADAPTER / CONFIG_FILE).is_file():
            raise UserError(f"no adapter named {name!r} in your workspace")
        self._remove([run] + self._routers_mixing(run))

    def _routers_mixing(self, run: Path) -> list[Path]:
        """The folders of this workspace's saved routers with an adapter inside `run`."""
        found, run = [], run.resolve()
        folder = self.root / "compositions"
        for spec in sorted(folder.glob("*/composition.json")) if folder.is_dir() else []:
            adapters = (_optional_json(spec) or {}).get("adapters")
            if isinstance(adapters, list) and any(isinstance(a, str) and Path(a).resolve().is_relative_to(run)
                                                  for a in adapters):
                found.append(spec.parent)
        return found

    def reset(self) -> int:
        """Remove every run of this workspace (its adapters, trained or imported) and its saved routers;
        returns how many runs it removed. Nothing else is touched (in the root workspace: users/, shared/, results/)."""
        runs = [f for f in self.root.iterdir() if _PLAIN.fullmatch(f.name) and not f.is_symlink() and f.is_dir()
                and ((f / RUN_ADAPTER).is_dir() or (f / "job.json").is_file())] if self.root.is_dir() else []
        self._remove(runs + [self.root / "compositions"])
        return len(runs)

    def _remove(self, folders: list[Path]) -> None:
        """Delete `folders` (in this workspace) unless a job of this workspace still trains in one."""
        with self._lock:  # no new run folder meanwhile
            busy = [j.id for j in self.jobs.values() if not j.finished and j.folder in folders]
            if busy:
                raise UserError(f"training job {busy[0]} is still queued or running: stop it first")
            for folder in folders:
                self.jobs.pop(folder.name, None)
                self._checked.pop(folder / RUN_ADAPTER, None)
                self.compositions.discard(folder)
                if folder.exists():
                    shutil.rmtree(folder)

    # ---- composition ----------------------------------------------------------------

    def composition(self, names: list[str], data_dir=None, router_steps: int = 150, base=None):
        """A router over the named LoRA-Diffusion adapters (one per task), trained once and kept.

        The trained router is saved under `compositions/` (safetensors + JSON), keyed by the
        adapters, so a second request for the same set loads it instead of training again; the
        last two used, of any user, stay in memory (`Compositions`).
        """
        if not isinstance(names, (list, tuple)) or len(names) < 2:
            raise UserError("pick at least two LoRA-Diffusion adapters, one per task, to compose")
        paths = [self.adapter_path(n, needs_task=True) for n in sorted(names)]  # checked before anything is read
        key = hashlib.sha1("|".join(sorted(names)).encode()).hexdigest()[:12]
        folder = self.root / "compositions" / f"{key}-{router_steps}"
        cached = self.compositions.get(folder)
        if cached is not None:
            return cached
        if (folder / "composition.json").is_file():
            composition = Composition.load(folder, base=base)
        else:
            composition = trained_composition(paths, base, data_dir, max_train=2000, max_eval=1,
                                              router_steps=router_steps, progress=False)[0]
            composition.save(folder)
        composition.use(None)
        composition.model.eval()
        self.compositions.put(folder, composition)
        return composition


def _remove_old(paths) -> None:
    """Remove the files among `paths` older than EXPORT_HOURS (gradio has its own copy by then)."""
    for old in paths:
        try:
            if old.is_file() and old.stat().st_mtime < time.time() - EXPORT_HOURS * 3600:
                old.unlink()
        except FileNotFoundError:
            pass


def _optional_json(path: Path) -> dict | None:
    """A run's own JSON file, or None where it is absent or unreadable (it only adds to a listing)."""
    try:
        value = read_json(path) if path.is_file() else None
    except UserError:
        return None
    return value if isinstance(value, dict) else None


