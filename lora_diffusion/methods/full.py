"""Full fine-tuning: every weight of the base is trained (the reference point)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .base import BaseSnapshot, Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    method = "full"

    def default_lr(self) -> float:
        return 5e-5


class FullFineTune(Method):
    name = "full"
    Config = FullConfig
    # Set before attach to keep a copy of every weight, so that detach() can put the base back.
    # Off by default: it is a second copy of the model, which training never needs.
    keep_base = False

    def attach(self, model) -> None:
        self.model = model
        self._remember_requires_grad(model.backbone.mlm)
        self.snapshot = BaseSnapshot(dict(model.backbone.mlm.named_parameters())) if self.keep_base else None
        for p in model.backbone.mlm.parameters():
            p.requires_grad_(True)

    def detach(self) -> None:
        if self.snapshot is None:
            raise UserError("full fine-tuning changed the base's own weights and kept no copy of them; "
                            "set keep_base = True before attach to detach it, or load the base again")
        self.snapshot.restore()
        super().detach()

    def trainable_parameters(self):
        # named_parameters() lists a tied weight (input embeddings = LM decoder) once.
        return dict(self.model.backbone.mlm.named_parameters())
