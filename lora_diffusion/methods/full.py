"""Full fine-tuning: every weight of the base is trained (the reference point)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BaseSnapshot, Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    method = "full"

    def default_lr(self) -> float:
        return 5e-5


class FullFineTune(Method):
    name = "full"
    Config = FullConfig

    def attach(self, model) -> None:
        self.model = model
        self._remember_requires_grad(model.backbone.mlm)
        self.snapshot = BaseSnapshot(dict(model.backbone.mlm.named_parameters()))
        for p in model.backbone.mlm.parameters():
            p.requires_grad_(True)

    def detach(self) -> None:
        self.snapshot.restore()
        super().detach()

    def trainable_parameters(self):
        # named_parameters() lists a tied weight (input embeddings = LM decoder) once.
        return dict(self.model.backbone.mlm.named_parameters())
