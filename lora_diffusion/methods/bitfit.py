"""BitFit (Ben Zaken et al., 2021): train only the bias terms of the base.

Every bias of the masked LM is trained: attention and MLP projections, LayerNorm
shifts, and the LM head's transform and output bias (the output bias is the
generative counterpart of a classifier's bias, so it belongs to the method).
"""

from __future__ import annotations

from .base import Method, freeze


class BitFit(Method):
    name = "bitfit"
    default_lr = 1.5e-3

    def __init__(self):
        super().__init__()

    def attach(self, model) -> None:
        self.model = model
        mlm = model.backbone.mlm
        freeze(mlm)
        for name, p in mlm.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}
