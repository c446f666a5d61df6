"""The interface every fine-tuning method implements."""

from __future__ import annotations

import torch
from torch import nn


class Method:
    """Base class: subclasses set `name`, `default_lr` and implement `attach`."""

    name = "method"
    default_lr = 1e-4

    def __init__(self, **options):
        self.options = options
        self.model = None

    def attach(self, model) -> None:
        """Prepare `model` (a DiffusionLM) for training with this method."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything the optimiser updates (tied weights once)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what the method's adapter file holds."""
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            from ..errors import UserError
            raise UserError(f"adapter state does not fit method {self.name!r}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != state[name].shape:
                    from ..errors import UserError
                    raise UserError(f"adapter tensor {name} has shape {tuple(state[name].shape)}, "
                                    f"the model expects {tuple(p.shape)}")
                p.copy_(state[name].to(p.dtype))

    def regularization(self):
        """Extra loss term added to the diffusion loss at every step (None: nothing)."""
        return None

    # Merging folds the method into the base weights for inference; only methods that
    # change weights linearly (weight LoRA, DoRA) can do it.
    can_merge = False

    def merge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base")

    def unmerge(self) -> None:
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the base")

    def config(self) -> dict:
        """Hyperparameters, stored in the adapter's JSON config."""
        return dict(self.options)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())
