"""Full fine-tuning: every weight of the base is trained (the reference point)."""

from __future__ import annotations

from .base import Method


class FullFineTune(Method):
    name = "full"
    default_lr = 5e-5

    def __init__(self):
        super().__init__()

    def attach(self, model) -> None:
        self.model = model
        for p in model.backbone.mlm.parameters():
            p.requires_grad_(True)

    def trainable_parameters(self):
        # named_parameters() lists a tied weight (input embeddings = LM decoder) once.
        return dict(self.model.backbone.mlm.named_parameters())
