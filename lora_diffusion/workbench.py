"""The workbench's engine: what the Gradio app and the notebooks call.

A `Workspace` is a folder of runs. `start_training` fine-tunes in a background thread
(one at a time per workspace; later ones wait their turn) and keeps every log record, so
a page can poll it for a live loss curve; `TrainJob.stop` ends training at the next step
and the adapter trained so far is evaluated and saved like any finished run. Adapters
come in and go out as zip files holding safetensors + JSON only.

`denoising_trajectory` decodes one prompt and returns the unmasking step by step as
plain data (token strings, their state, the step's perturbation norm).
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .io import read_json, write_json, write_text

ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json")
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

    def losses(self) -> tuple[list[int], list[float]]:
        rows = [r for r in self.records if "loss" in r]
        return [r["step"] for r in rows], [r["loss"] for r in rows]

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
        from .methods import make_method
        from .train import TrainConfig

        config = config or TrainConfig()
        method_obj = make_method(method, **(options or {}))  # bad options fail here, in the caller
        run_id, folder = self._new_folder(f"{method}-{task.name}")
        spec = {"task": task.name, "method": method, "options": method_obj.config(), "steps": config.steps,
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
        from .backbone import load_backbone
        from .train import fine_tune

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
        for config_path in self.root.glob("*/adapter/adapter_config.json"):
            run = config_path.parent.parent
            config = read_json(config_path)
            results = read_json(run / "results.json") if (run / "results.json").is_file() else {}
            found.append({"name": run.name, "path": str(config_path.parent), "method": config["method"],
                          "task": config["task"]["name"], "accuracy": results.get("accuracy"),
                          "rouge_l": results.get("rouge_l"),
                          "trainable_parameters": config["accounting"]["trainable_parameters"]})
        return sorted(found, key=lambda a: a["name"], reverse=True)

    def adapter_path(self, name: str) -> Path:
        path = self.root / name / "adapter"
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"no adapter named {name!r} in this workspace")
        return path

    def export_adapter(self, name: str) -> Path:
        """A zip of the adapter's safetensors + JSON (what `import_adapter` takes back)."""
        folder = self.adapter_path(name)
        target = self.root / name / f"{name}.zip"
        tmp = target.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix in (".safetensors", ".json"):
                    z.write(path, path.relative_to(folder))
        tmp.replace(target)
        return target

    def import_adapter(self, path) -> str:
        """Add an adapter from a zip (as exported) or from its two files; returns its name.

        Only .safetensors and .json members are read; the config must be a lora-diffusion
        adapter config and the tensors must load as safetensors (nothing is unpickled).
        """
        from .io import ADAPTER_FORMAT, load_tensors

        paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        for p in paths:
            if p.stat().st_size > MAX_UPLOAD_BYTES:
                raise UserError(f"{p.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        run_id, folder = self._new_folder("imported")
        target = folder / "adapter"
        target.mkdir()
        try:
            if len(paths) == 1 and paths[0].suffix == ".zip":
                with zipfile.ZipFile(paths[0]) as z:
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
            else:
                for p in paths:
                    if p.name.split("_", 1)[-1] not in ADAPTER_FILES and p.name not in ADAPTER_FILES:
                        raise UserError(f"{p.name}: upload adapter.safetensors and adapter_config.json, "
                                        "or the zip the workbench exports")
                    shutil.copyfile(p, target / (ADAPTER_FILES[0] if p.suffix == ".safetensors" else ADAPTER_FILES[1]))
            for needed in ADAPTER_FILES:
                if not (target / needed).is_file():
                    raise UserError(f"the upload has no {needed}")
            config = read_json(target / "adapter_config.json")
            if config.get("format") != ADAPTER_FORMAT:
                raise UserError("adapter_config.json is not a lora-diffusion adapter config")
            try:
                load_tensors(target / "adapter.safetensors")
            except Exception as e:
                raise UserError(f"adapter.safetensors does not load as safetensors: {e}") from None
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
        import hashlib

        from .analysis.composition import trained_composition
        from .router import Composition

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


def router_weights_figure(labels: list[str], weights: list[float], instruction: str):
    """Bar chart of a router's weights over its task adapters for one instruction."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=labels, y=weights, text=[f"{w:.2f}" for w in weights], textposition="auto"))
    fig.update_layout(template="plotly_white", yaxis_range=[0, 1], yaxis_title="router weight",
                      title=f"Router weights for: {instruction[:80]}")
    return fig


# ---- looking at one generation ----------------------------------------------------------

def load_model(adapter=None, base=None):
    """(model, method or None, adapter config or None): the base alone, or base + a saved adapter."""
    from .backbone import load_backbone
    from .diffusion import DiffusionLM
    from .io import load_adapter

    if adapter is None:
        model = DiffusionLM(load_backbone(base))
        model.eval()
        return model, None, None
    return load_adapter(adapter, base=base, merge=True)


def denoising_trajectory(model, instruction: str, text: str, length: int = 8, steps: int = 8,
                         temperature: float = 0.0, seed: int = 0, remasking: str = "low_confidence") -> dict:
    """Decode one prompt; per step the response tokens, their state and the perturbation norm.

    state per position: "masked", "new" (revealed at this step) or "settled". The norm is
    the mean L2 norm over response positions of what the model's step hook added to h_t
    (None for a model without one, e.g. the base or a merged weight LoRA).
    """
    from .data import collate, encode
    from .diffusion import sample

    if not instruction.strip() and not text.strip():
        raise UserError("type an instruction or an input")
    if length < 1 or steps < 1:
        raise UserError("length and steps must be at least 1")
    backbone = model.backbone
    tok = backbone.tokenizer
    enc = encode(tok, [{"instruction": instruction, "input": text, "response": ""}], length,
                 backbone.max_length, truncate=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(enc, [0], backbone.pad_id).items()}
    generator = torch.Generator().manual_seed(seed)
    tokens, trajectory = sample(model, **batch, steps=steps, temperature=temperature, remasking=remasking,
                                generator=generator, record=True)
    response = batch["response_mask"][0]
    frames = []
    for t, x, revealed, delta in zip(trajectory.t, trajectory.tokens, trajectory.revealed,
                                     trajectory.perturbation):
        ids = x[0][response].tolist()
        new = revealed[0][response].tolist()
        frames.append({"t": t,
                       "tokens": tok.convert_ids_to_tokens(ids),
                       "state": ["new" if n else "masked" if i == backbone.mask_id else "settled"
                                 for i, n in zip(ids, new)],
                       "perturbation_norm": None if delta is None else float(delta.norm(dim=-1).mean())})
    answer_ids = tokens[0][response].tolist()
    if backbone.sep_id in answer_ids:
        answer_ids = answer_ids[:answer_ids.index(backbone.sep_id)]
    return {"instruction": instruction, "input": text, "steps": frames,
            "answer": tok.decode(answer_ids, skip_special_tokens=True)}


# ---- figures ------------------------------------------------------------------------------

def training_figure(records: list[dict], title: str = "Training"):
    """Train loss (left axis) and the periodic held-out monitor score (right axis) against step."""
    import plotly.graph_objects as go

    fig = go.Figure()
    losses = [r for r in records if "loss" in r]
    fig.add_trace(go.Scatter(x=[r["step"] for r in losses], y=[r["loss"] for r in losses],
                             mode="lines+markers", name="train loss"))
    for key, name in (("eval_monitor_accuracy", "held-out accuracy"), ("eval_monitor_rouge_l", "held-out ROUGE-L")):
        points = [r for r in records if key in r]
        if points:
            fig.add_trace(go.Scatter(x=[r["step"] for r in points], y=[r[key] for r in points], yaxis="y2",
                                     mode="lines+markers", name=name))
    fig.update_layout(template="plotly_white", title=title, xaxis_title="step", yaxis_title="diffusion loss",
                      yaxis2=dict(title="held-out score", overlaying="y", side="right", range=[0, 1]),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def trajectory_figure(trajectories: dict[str, dict]):
    """Perturbation norm per denoising step, one line per model that has a step hook."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, report in trajectories.items():
        norms = [s["perturbation_norm"] for s in report["steps"]]
        if any(n is not None for n in norms):
            fig.add_trace(go.Scatter(x=[s["t"] for s in report["steps"]], y=norms, mode="lines+markers", name=label))
    fig.update_layout(template="plotly_white", title="Per-step perturbation norm ‖δ_t‖ (mean over response tokens)",
                      xaxis_title="t (1 = all masked)", yaxis_title="‖δ_t‖", xaxis_autorange="reversed")
    return fig
