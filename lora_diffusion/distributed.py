"""One run on several processes (under `accelerate launch` or `torchrun`): DDP, FSDP or DeepSpeed.

Each optimiser step has grad_accum x processes micro-batches, dealt round-robin: process
r computes micro-batches r, r + P, r + 2P, ... with the noise a 1-process run would draw
for them, and the gradients are averaged, so every process takes the same step. For a
base without dropout, a run on P processes is therefore the 1-process run with P times
the accumulation (the same global batch, the same noise), up to the order of
floating-point sums. With dropout, each micro-batch draws its masks from a seed of
(seed, step, micro-batch): processes draw different masks, a resumed run the same ones,
but not the masks a 1-process run draws. The main process alone logs, evaluates,
checkpoints and writes; every process reads a checkpoint to resume.

The engine is DDP (accelerate's MULTI_GPU, or MULTI_CPU over gloo), FSDP (version 2,
torch's `fully_shard`, one unit per transformer block plus the rest) or DeepSpeed ZeRO-2
(its engine and optimiser: `zero.py`; each process keeps whole parameters and its
partition of AdamW's moments, of the fp32 master copy and of the gradients). Under FSDP each
process holds, between forwards, a shard of every parameter of the base (trained or
frozen, with what a method puts inside it: LoRA matrices, adapters); the method's own
modules outside the base (LoRA-Diffusion's, prefixes) stay whole on every process and
their gradients are averaged as DDP does (`average_replicated`). What the loop needs whole
is gathered on every process: a checkpoint's tensors (`full`, a collective; a resume cuts
each shard back out, `assign` / `shard_like`), and the model for an evaluation, which
the main one then runs alone (`whole_model`). What follows training (scoring, merging,
saving) runs on a whole copy the main process builds from the base's files and the
gathered adapter (`runs.fine_tune`). Under DeepSpeed the checkpoint gathers AdamW's moments
likewise (every process takes part); the model is whole on every process. Without a
launcher nothing here starts a process group. Reading the rank and the world size needs no
torch, so the CLI can ask cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os


def world_size() -> int:
    """How many processes train this run (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def micro_batches_per_step(grad_accum: int) -> int:
    """Micro-batches of one optimiser step over every process (the global batch / --batch-size)."""
    return grad_accum * world_size()


def my_micro_batches(grad_accum: int) -> list[int]:
    """The indices, among the step's grad_accum x world_size() micro-batches, this process computes."""
    return list(range(rank(), micro_batches_per_step(grad_accum), world_size()))


class Processes:
    """The run's processes as the training loop sees them (one, or an accelerate Accelerator's)."""

    def __init__(self, device: str = "auto"):
        self.accelerator = None
        self.engine = "one process"  # or "ddp", "fsdp", "deepspeed": as results.json states it
        self.sharded = False  # FSDP: parameters are shards between forwards
        self.replicated = []  # FSDP: the method's own parameters, kept whole on every process
        if world_size() > 1:
            from datetime import timedelta

            import torch
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

            from .errors import UserError

            # accelerate launch says what the config file asks in the environment.
            self.sharded = sharding()
            if _flag("ACCELERATE_USE_DEEPSPEED"):
                from .zero import check_offered

                self.engine = "deepspeed"
                check_offered(device)
            elif self.sharded:
                from torch.distributed.fsdp import FSDPModule

                if os.environ.get("FSDP_VERSION", "1") != "2":
                    raise UserError("FSDP needs fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)")
                if not all(hasattr(FSDPModule, name) for name in ("reset_iter_state",
                                                                  "set_reduce_scatter_unused_params")):
                    raise UserError(f"FSDP needs a newer torch than {torch.__version__} (tested with 2.13)")
                self.engine = "fsdp"
            else:
                self.engine = "ddp"
            # The other processes wait in a barrier while the main one evaluates: give them hours.
            hours = timedelta(hours=3)
            if self.engine == "deepspeed":
                # accelerate has DeepSpeed start the process group only for a run not marked cpu;
                # without CUDA, DeepSpeed's CPU backend talks over gloo.
                group = (InitProcessGroupKwargs(timeout=hours) if torch.cuda.is_available()
                         else InitProcessGroupKwargs(backend="gloo", timeout=hours))
                from .zero import stdout_to_stderr

                with stdout_to_stderr():
                    self.accelerator = Accelerator(kwargs_handlers=[group])
                return
            # A step-aware adapter leaves the modules of phases no example of a batch is in
            # without a gradient: DDP must expect parameters that were not used.
            self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(),
                                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                                                            InitProcessGroupKwargs(timeout=hours)])

    @property
    def gathers(self) -> bool:
        """Whether writing a checkpoint is a collective (every process gathers what the main
        one writes: FSDP's shards, DeepSpeed's partitions of AdamW's moments)."""
        return self.engine in ("fsdp", "deepspeed")

    @property
    def device(self):
        return self.accelerator.device if self.accelerator else None

    def wrap(self, model, units: list, replicated: list):
        """The model the loss calls: DDP's wrapper around `model`, or under FSDP `model` itself
        with its parameters replaced by shards (torch's `fully_shard`: each of `units` gathered
        for its own forward, the rest for the whole one) except the `replicated` ones, whole on
        every process (see `average_replicated`). Make the optimiser after this. (Under DeepSpeed
        `model` itself: its engine comes with the optimiser, `prepare_optimizer`.)"""
        if self.accelerator is None or self.engine == "deepspeed":
            return model
        if not self.sharded:
            return self.accelerator.prepare(model)
        # accelerate shards only on CUDA (its CPU processes are DDP): torch's API does it on both.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.replicated = replicated
        mesh = init_device_mesh(self.device.type, (world_size(),))  # the processes' device (--device cpu too)
        for unit in units:
            fully_shard(unit, mesh=mesh, ignored_params=set(replicated))
        model = fully_shard(model, mesh=mesh, ignored_params=set(replicated))
        # The base's parameters run at every step, so all processes reduce the same ones. Should
        # one lack a gradient on some process, it reduces zeros instead of desynchronising the
        # collectives (and one no process used would then take an AdamW step with a zero gradient).
        model.set_reduce_scatter_unused_params(True)
        return model

    def average_replicated(self) -> None:
        """Under FSDP, after a step's backward passes: average the replicated parameters' gradients
        over the processes as DDP does. A parameter no process used keeps no gradient (AdamW
        leaves it alone, as on one process); one some process used gets the mean, with zero
        from the others."""
        if not self.sharded or not self.replicated:
            return
        import torch
        import torch.distributed as dist

        used = torch.tensor([p.grad is not None for p in self.replicated], dtype=torch.uint8,
                            device=self.accelerator.device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        live = [p for p, u in zip(self.replicated, used.tolist()) if u]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
        dist.all_reduce(flat)
        flat /= world_size()
        for p, grad in zip(live, flat.split([p.numel() for p in live])):
            p.grad = grad.view_as(p).clone()

    @staticmethod
    def held_bytes(model) -> int:
        """Bytes of `model`'s parameters this process holds between forwards (under FSDP its shards)."""
        return sum(_local(p).numel() * p.element_size() for p in model.parameters())

    @staticmethod
    def optimizer_bytes(optimizer) -> int:
        """Bytes of the optimiser's own tensors this process holds: AdamW's moments (under FSDP
        their shards; under DeepSpeed its partition of them, and of its fp32 master copy)."""
        if hasattr(optimizer, "bytes_held"):  # zero.ZeroOptimizer
            return optimizer.bytes_held()
        import torch

        return sum(_local(t).numel() * t.element_size() for state in optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim())

    def prepare_optimizer(self, objective, optimizer, micro_batch_size: int, grad_accum: int, clip: float):
        """(objective, optimiser) as the loop steps them: under DDP accelerate's wrapper of the
        optimiser; under FSDP torch's own, over the shards; under DeepSpeed its engine around the
        objective and its ZeRO-2 optimiser (`zero.ZeroOptimizer`), which clips to `clip` itself."""
        if self.engine == "deepspeed":
            from .zero import initialize

            return initialize(objective, optimizer, micro_batch_size, grad_accum, clip, world_size())
        if self.accelerator is not None and not self.sharded:
            optimizer = self.accelerator.prepare(optimizer)
        return objective, optimizer

    def step(self, optimizer, params: list, clip: float) -> float:
        """Clip the gradients of `params` to norm `clip` (0: off) and take the optimiser's step,
        unless their norm is not finite; the norm before clipping either way. (DeepSpeed's step
        does all of it.)"""
        import math

        import torch

        if self.engine == "deepspeed":
            optimizer.step()
            return optimizer.grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip or float("inf")))
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def wait_for_all(self) -> None:
        """Every process waits here until all have come (a barrier of the run's process group,
        whose timeout is hours: the collectives of DeepSpeed's own group would time out sooner)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (every process gets it)."""
        if self.accelerator is None:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    @contextlib.contextmanager
    def accumulating(self, objective, last: bool):
        """The context of one micro-batch's forward and backward: under DDP and FSDP gradients are
        averaged over the processes with the step's `last` micro-batch's backward, not before.
        (ZeRO-2 reduces each micro-batch's gradients into the partitions as they come; DeepSpeed
        is told which one is the step's last.)"""
        if self.engine == "deepspeed":
            objective.set_gradient_accumulation_boundary(last)
            yield
        elif last or self.accelerator is None:
            yield
        elif self.sharded:
            objective.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                objective.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(objective):
                yield

    def backward(self, objective, loss) -> None:
        """`loss.backward()`, through DeepSpeed's engine under DeepSpeed (`loss` already divided
        by the step's micro-batches: the engine must not divide it again)."""
        if self.engine == "deepspeed":
            objective.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    @contextlib.contextmanager
    def whole_model(self, model):
        """Under FSDP: every process gathers every parameter of the prepared `model`, so that
        inside, one process may run forwards of its parts alone (nothing is gathered or freed
        per forward); every process must enter. Elsewhere: nothing to do."""
        if not self.sharded:
            yield
            return
        units = _fsdp_units(model)
        for unit in units:
            # A forward inside calls the blocks, not the root (`model`): they must not free their
            # parameters after it, or the next one would gather them on one process alone.
            if unit is not model:
                unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                if unit is not model:  # the root keeps FSDP's own choice (not to free after a forward)
                    unit.set_reshard_after_forward(True, recurse=False)
            # Shards again, and forgets the order the forwards inside ran in: on the main process
            # alone it would make the next backward prefetch blocks the others do not. (torch
            # documents this call for recovering after an exception; it is the one that resets
            # both, and the loop calls it between steps, with no gradient in flight.)
            model.reset_iter_state()


def sharding() -> bool:
    """Whether this run shards its model: FSDP, as `accelerate launch` with fsdp.yaml asks."""
    return world_size() > 1 and _flag("ACCELERATE_USE_FSDP")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def full(tensors: dict) -> dict:
    """`tensors` whole, on the CPU, one at a time (under FSDP each gather is a collective: every
    process must call this)."""
    return {name: full_tensor(t).cpu() for name, t in tensors.items()}


def full_tensor(t):
    """`t` whole: a DTensor (a shard of an FSDP parameter or of its optimiser state) gathered
    from every process (a collective); any other tensor as it is."""
    if _is_dtensor(t):
        return t.full_tensor()
    return t


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def shard_like(param, value):
    """The whole tensor `value` cut as `param` is (under FSDP: this process's shard, cut locally,
    as every process holds the same `value`); elsewhere `value` itself."""
    if not _is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def assign(param, value) -> None:
    """Write the whole tensor `value` into `param` (under FSDP: into its shard; under DeepSpeed
    ZeRO into its fp32 master copy too, which DeepSpeed's next step would write back)."""
    param.copy_(shard_like(param, value))
    if hasattr(param, "_hp_mapping"):  # what DeepSpeed ties a ZeRO-1/2 parameter to its master copy with
        from .zero import write_master

        write_master(param, value)


def _is_dtensor(t) -> bool:
    if world_size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def close_process_group(finished: bool) -> None:
    """Leave the run's process group, if this process joined one: once every process is done
    (`finished`: all get there), so none closes its connections while another still reads
    them (gloo then aborts that one as it ends)."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def share(value, device="cpu"):
    """The main process's JSON-able `value`, on every process (as JSON, never pickled).

    `device`: where the collective runs (a CUDA device under NCCL)."""
    if world_size() == 1:
        return value
    import torch
    import torch.distributed as dist

    data = json.dumps(value).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if is_main():
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()).decode())
