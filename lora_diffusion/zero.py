"""DeepSpeed ZeRO-2 as the training loop sees it: an engine around the objective, and AdamW.

Under ZeRO-2 every process keeps the whole parameters, but only its partition of the
trained ones' fp32 master copy, of AdamW's moments and of the averaged gradients. The
step is DeepSpeed's: it clips (to the run's --clip), skips an update whose gradient norm
is not finite, updates its partition and writes the result back into every process's
parameters. What follows for the loop, handled here and in `distributed`:

- the loop's AdamW is handed to DeepSpeed, which keeps a flat partition per parameter
  group; `ZeroOptimizer` shows it as torch does (a group per kind of parameter, a state
  per parameter), so checkpoints hold the same files on every engine;
- a parameter written in place (a checkpoint loaded, LoRA-Diffusion's proximal step) must
  be written into DeepSpeed's master copy too, or its next step brings the old value back
  (`distributed.assign` does both);
- ZeRO-2 reduces gradients in the order they arrive, so every process must produce the
  same ones in the same order: a method whose modules act on some rows only computes every
  module at each step (`Method.every_parameter_each_step`), on no rows where none is its;
- AdamW then sees a zero gradient where torch's would see none: a parameter no example of a
  step used still takes a step (its momentum moves it; weight decay shrinks it), and a
  group's parameters share one step count (a module first used at step k gets step k's
  bias correction, not step 1's). A step-aware adapter whose phase no example of a global
  batch fell in therefore trains differently from one process; a method whose every
  parameter acts at every step does not.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

TESTED = "0.19.8"  # the DeepSpeed release this module was written against and tested with
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, beside its step count


@contextlib.contextmanager
def stdout_to_stderr():
    """A context in which DeepSpeed's prints (its op builds) and logs go to stderr: stdout is
    where the CLI writes its results. Its logger writes to the stdout of the moment it was
    made, on DeepSpeed's import (which accelerate and transformers may have done already)."""
    import logging
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401  (made here, its logger writes to stderr)

        for handler in logging.getLogger("DeepSpeed").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stdout__:
                handler.setStream(sys.stderr)
        yield


def check_offered(device: str) -> None:
    """Refuse what the DeepSpeed path does not offer: ZeRO stages other than 2, offloading, a
    DeepSpeed config file (the loop writes DeepSpeed's config from its own settings), a CPU run
    on a machine with CUDA (DeepSpeed picks the accelerator), DeepSpeed missing."""
    import importlib.util
    import os

    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage != "2":
        raise UserError(f"DeepSpeed ZeRO stage {stage} is not offered, only 2 (configs/accelerate/deepspeed.yaml)")
    for what in ("OPTIMIZER", "PARAM"):
        if os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none") not in ("none", ""):
            raise UserError("DeepSpeed offloading is not offered: set offload_*_device: none")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("none", ""):
        raise UserError("a DeepSpeed config file is not read: lora-diffusion writes DeepSpeed's config from its "
                        "own flags (--batch-size, --grad-accum, --clip); launch with configs/accelerate/deepspeed.yaml")
    if device == "cpu" and torch.cuda.is_available():
        raise UserError("under DeepSpeed the processes run on the GPUs: leave --device at auto, or use ddp.yaml")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("DeepSpeed is not installed: pip install 'lora-diffusion[deepspeed]'")


def write_master(param, value) -> None:
    """Write the whole tensor `value` into DeepSpeed's fp32 master copy of `param` (this
    process's part of it), which its next step would otherwise write back over `param`."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


def initialize(objective: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int,
               grad_accum: int, clip: float, world_size: int):
    """DeepSpeed's engine around `objective` with `optimizer` (AdamW over the trained
    parameters) handed to ZeRO-2: (engine, ZeroOptimizer)."""
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # one INFO block per process and step otherwise
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,  # each process's micro-batches per step
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": clip,  # 0: off, as --clip 0
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as on one process
        "steps_per_print": 2**62,
    }
    groups = [{**group, "params": list(group["params"])} for group in optimizer.param_groups]
    with stdout_to_stderr():
        engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config,
                                               dist_init_required=False)
    return engine, ZeroOptimizer(engine, groups)


class ZeroOptimizer:
    """AdamW as torch shows it (`param_groups`, `state_dict`, `load_state_dict`, `step`,
    `zero_grad`) over DeepSpeed's ZeRO-2 partitions.

    `param_groups` are the loop's groups (one entry per parameter); the learning rate set
    there is passed on at each step. `state_dict` and `load_state_dict` move whole tensors
    in torch's layout (state per parameter index): each is a collective, every process
    must call it. `step` runs the engine's step and keeps its gradient norm (before
    clipping; infinite when DeepSpeed skipped the update)."""

    def __init__(self, engine, groups: list[dict]):
        self.engine = engine
        self.param_groups = groups
        self.zero = engine.optimizer  # DeepSpeed's ZeRO optimizer
        if not all(hasattr(self.zero, name) for name in ("_lazy_init_hp_params_optimizer_state",
                                                         "_hp_optimizer_states_linked")):  # see `_link_state`
            import deepspeed

            raise UserError(f"this DeepSpeed ({deepspeed.__version__}) lacks a call lora-diffusion needs to save "
                            f"and restore AdamW's state; use deepspeed {TESTED}")
        self.inner = self.zero.optimizer  # the loop's AdamW, now over one flat partition per group
        # The loop's groups that have parameters (DeepSpeed drops the others), beside AdamW's
        # group over their partition
        live = [group for group in groups if group["params"]]
        if [len(g["params"]) for g in live] != [len(g) for g in self.zero.bit16_groups]:
            raise UserError(f"DeepSpeed regrouped the parameters ({[len(g['params']) for g in live]} became "
                            f"{[len(g) for g in self.zero.bit16_groups]}); tested with deepspeed {TESTED}")
        self.pairs = list(zip(live, self.inner.param_groups))
        self.grad_norm = None

    def _partitions(self) -> list[torch.Tensor]:
        """This process's flat fp32 partition of each group (what AdamW updates)."""
        return [group["params"][0] for group in self.inner.param_groups]

    def step(self) -> None:
        for mine, theirs in self.pairs:
            theirs["lr"] = mine["lr"]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # only with zero_optimization.compute_grad_norm false, which `initialize` never sets
            raise RuntimeError("DeepSpeed computed no gradient norm")
        self.grad_norm = float(norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def bytes_held(self) -> int:
        """Bytes this process holds for the optimiser: its partitions' moments and fp32 master copy."""
        tensors = [t for s in self.inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        return sum(t.numel() * t.element_size() for t in tensors + self._partitions())

    def _link_state(self) -> None:
        """Tie each parameter's slice of AdamW's state to the parameter, for DeepSpeed's
        safe_get/set_full_optimizer_state. DeepSpeed ties them once, right after its first
        update of the first group, so a later group stays tied to an empty state; there is no
        public call to tie them again."""
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def state_dict(self) -> dict:
        """Torch's layout, whole tensors (a collective). Every parameter of a group shares the
        group's step count."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_state()
        state, index, groups = {}, 0, []
        held = {id(mine): self.inner.state.get(theirs["params"][0], {}) for mine, theirs in self.pairs}
        for group in self.param_groups:
            moments = held.get(id(group), {})  # empty before the first step, and for a group without parameters
            indices = []
            for p in group["params"]:
                if moments:
                    state[index] = {"step": moments["step"].detach().clone().cpu(),
                                    **{k: safe_get_full_optimizer_state(p, k).cpu() for k in MOMENTS}}
                indices.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Put back what `state_dict` returned (or torch's AdamW saved: its layout is the same).
        A parameter the checkpoint has no state for starts from zero moments; a group takes
        the largest step count of its parameters."""
        from deepspeed.utils import safe_set_full_optimizer_state

        sizes, kept = ([len(g["params"]) for g in groups] for groups in (self.param_groups, saved["param_groups"]))
        if kept != sizes:
            raise UserError(f"the checkpoint's optimiser has groups of {kept} parameters, this run's {sizes}")
        saved_of, index = {}, 0
        for group, stored in zip(self.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in stored.items() if k != "params"})
            saved_of[id(group)] = [saved["state"].get(index + i) for i in range(len(group["params"]))]
            index += len(group["params"])
        # AdamW makes its state at its first step: make it now, as that step would (a group
        # without a saved state as if fresh), then tie each parameter's slice of it to it.
        for mine, theirs in self.pairs:
            theirs.update({k: v for k, v in mine.items() if k != "params"})
            partition = theirs["params"][0]
            step = max((float(s["step"]) for s in saved_of[id(mine)] if s), default=0.0)
            on_device = theirs.get("fused") or theirs.get("capturable")
            self.inner.state[partition] = {
                "step": torch.tensor(step, dtype=torch.float32, device=partition.device if on_device else "cpu"),
                **{key: torch.zeros_like(partition) for key in MOMENTS}}
        self._link_state()
        for mine, theirs in self.pairs:
            for p, s in zip(mine["params"], saved_of[id(mine)]):
                if s:
                    for key in MOMENTS:
                        safe_set_full_optimizer_state(p, s[key].to(theirs["params"][0].device), key)
