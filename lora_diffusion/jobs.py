"""Training jobs of the app: what one job may ask (`JobLimits`), one fair queue (`JobQueue`), a job (`TrainJob`).

A job runs in a background thread of the workspace that started it; every workspace of
one root shares one queue, first come first served, so a position can be shown while a
job waits. `TrainJob.stop` works at every stage (see `workspace.Workspace._run`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

STOPPED_FILE = "stopped.json"  # in a run folder: the run was stopped (when, why, what it was scored on)


@dataclass(frozen=True)
class JobLimits:
    """What one job and one user may ask of the shared CPU, so no one's job holds the queue for ever."""

    steps: int = 5000
    batch_size: int = 64
    seconds: float | None = 20 * 60   # wall-clock training time of one job; then it stops as if by Stop
    jobs_per_user: int = 2            # queued or running at once, per workspace
    waiting: int = 16                 # jobs waiting in the queue, all users together


class JobQueue:
    """Training slots shared by every workspace of one root: first come, first served."""

    def __init__(self, slots: int = 1, waiting: int = 16):
        self._cond = threading.Condition()
        self._slots, self._running = slots, 0
        self._waiting: list[TrainJob] = []
        self.max_waiting = waiting

    def join(self, job: "TrainJob") -> None:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise UserError(f"the training queue is full ({self.max_waiting} jobs waiting); "
                                "try again in a few minutes")
            self._waiting.append(job)

    def wait_turn(self, job: "TrainJob") -> bool:
        """Block until `job` is first in line and a slot is free; False if it was stopped while waiting."""
        with self._cond:
            while not job.stop_requested and (self._waiting[0] is not job or self._running >= self._slots):
                self._cond.wait(0.5)  # a stop is seen within half a second without a wake-up call
            self._waiting.remove(job)
            self._cond.notify_all()
            if job.stop_requested:
                return False
            self._running += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def position(self, job: "TrainJob") -> int | None:
        """1 for the next job to start; None once it has left the queue."""
        with self._cond:
            return self._waiting.index(job) + 1 if job in self._waiting else None


class StoppedInEvaluation(Exception):
    """Raised from the model's head when a job is stopped during its final evaluation."""


@dataclass
class TrainJob:
    """One fine-tuning run in a background thread."""

    id: str
    folder: Path
    spec: dict
    status: str = "queued"           # queued, running, evaluating, done, stopped, failed
    records: list = field(default_factory=list)
    result: dict | None = None
    error: str | None = None
    note: str | None = None          # why a stopped job ended as it did, for the page
    stopped: dict | None = None      # a job stopped while training: the step and the reason (it is not scored)
    started: float | None = None
    queue: JobQueue | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _reason: str = field(default="stopped by you", repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def stop(self, reason: str = "stopped by you") -> None:
        """End the job at whatever stage it is (see the module's docstring); the first reason given is kept."""
        if not self._stop.is_set():
            self._reason = reason
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (or `timeout`); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.finished

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "failed")

    @property
    def position(self) -> int | None:
        """Where the job waits in the queue (1 = next), None once it has started."""
        return self.queue.position(self) if self.queue is not None and self.status == "queued" else None

    @property
    def step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)

    def monitor(self) -> list[dict]:
        """The periodic held-out scores logged during training (step + eval_monitor_* keys)."""
        return [r for r in self.records if any(k.startswith("eval_monitor_") for k in r)]
