"""The interface every fine-tuning method implements."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class Method:
    """Base class: subclasses set `name`, `default_lr` and implement `attach`.

    A method owns what it adds to the model. `attach` freezes what the method does not
    train, registers new modules under the `DiffusionLM` (so `.to(device)` and
    `.train()` reach them), and sets the step hook when it acts on the trajectory.
    """

    name = "method"
    default_lr = 1e-4
    # Merging folds the method into the base weights for inference; only methods that
    # change weights linearly (weight LoRA, DoRA) can do it.
    can_merge = False

    def __init__(self, **options):
        self.options = options
        self.model = None
        self.merged = False

    def attach(self, model) -> None:
        """Prepare `model` (a DiffusionLM) for training with this method."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything the optimiser updates (tied weights once)."""
        raise NotImplementedError

    def buffers(self) -> dict[str, torch.Tensor]:
        """Non-trained tensors the adapter also needs (e.g. calibration statistics)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what the method's adapter file holds: trainable parameters and buffers."""
        return {name: p.detach() for name, p in {**self.trainable_parameters(), **self.buffers()}.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {**self.trainable_parameters(), **self.buffers()}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise UserError(f"adapter state does not fit method {self.name!r} with these options: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise UserError(f"adapter tensor {name} has shape {tuple(state[name].shape)}, "
                                f"the model expects {tuple(p.shape)} (another base or other options?)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.dtype))

    def regularization(self):
        """Extra loss term added to the diffusion loss at every step (None: nothing)."""
        return None

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step with the step's learning rate (proximal updates)."""

    def merge(self) -> None:
        raise UserError(f"method {self.name!r} cannot be merged into the base")

    def unmerge(self) -> None:
        raise UserError(f"method {self.name!r} cannot be merged into the base")

    def config(self) -> dict:
        """Hyperparameters, stored in the adapter's JSON config."""
        return dict(self.options)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def formula(self) -> dict:
        """The method's own parameter formula, term by term (empty where it is just a sum)."""
        return {}

    def accounting(self) -> dict:
        """Trainable parameters, share of the base, and the bytes of the adapter file's tensors.

        `adapter_bytes` is what `save_adapter` writes: the file's size minus its header.
        """
        from ..io import tensor_bytes

        state = self.state_dict()
        n = self.n_trainable()
        base = self.model.base_parameters
        return {"trainable_parameters": n, "base_parameters": base,
                "percent_of_base": 100.0 * n / base,
                "adapter_parameters": sum(t.numel() for t in state.values()),
                "adapter_bytes": tensor_bytes(state), **self.formula()}
