"""One run on several processes: data parallelism through accelerate (under `accelerate launch` or `torchrun`).

Each optimiser step has grad_accum x processes micro-batches, dealt round-robin: process
r computes micro-batches r, r + P, r + 2P, ... with the noise a 1-process run would draw
for them, and DDP averages the gradients, so every process takes the same step. For a
base without dropout, a run on P processes is therefore the 1-process run with P times
the accumulation (the same global batch, the same noise), up to the order of
floating-point sums. With dropout, each micro-batch draws its masks from a seed of
(seed, step, micro-batch): processes draw different masks, a resumed run the same ones,
but not the masks a 1-process run draws. The main process alone logs, evaluates,
checkpoints and writes; every process reads a checkpoint to resume.

The engine is DDP (accelerate's MULTI_GPU, or MULTI_CPU over gloo); FSDP and DeepSpeed,
which shard what the loop clips and saves, are refused. Without a launcher nothing here
starts a process group. Reading the rank and the world size needs no torch, so the CLI
can ask cheaply.
"""

from __future__ import annotations

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
        if world_size() > 1:
            from datetime import timedelta

            import torch
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

            from .errors import UserError

            # A step-aware adapter leaves the modules of phases no example of a batch is in
            # without a gradient: DDP must expect parameters that were not used. The other
            # processes wait in a collective while the main one evaluates: give them hours.
            self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(),
                                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                                                            InitProcessGroupKwargs(timeout=timedelta(hours=3))])
            engine = self.accelerator.distributed_type
            if engine not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
                raise UserError(f"training on several processes supports DDP only, not {engine.value}: launch with "
                                "configs/accelerate/ddp.yaml or torchrun")

    @property
    def device(self):
        return self.accelerator.device if self.accelerator else None

    def prepare(self, model, optimizer):
        """The model the loss calls (the engine's wrapper) and the optimiser the loop steps."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (every process gets it)."""
        if self.accelerator is None:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def no_sync(self, objective):
        """A context in which a backward does not average gradients yet (all but a step's last micro-batch)."""
        import contextlib

        return self.accelerator.no_sync(objective) if self.accelerator else contextlib.nullcontext()


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
