"""BitFit (Ben Zaken et al., 2021): train only the bias terms of the base.

Every bias of the masked LM is trained: attention and MLP projections, LayerNorm
shifts, and the LM head's transform and output bias (the output bias is the
generative counterpart of a classifier's bias, so it belongs to the method).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import BaseSnapshot, Method, MethodConfig, freeze


@dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"

    def default_lr(self) -> float:
        return 1.5e-3


class BitFit(Method):
    name = "bitfit"
    Config = BitFitConfig

    def attach(self, model) -> None:
        self.model = model
        mlm = model.backbone.mlm
        self._remember_requires_grad(mlm)
        freeze(mlm)
        biases = {name: p for name, p in mlm.named_parameters() if name.endswith("bias")}
        self.snapshot = BaseSnapshot(biases)
        for p in biases.values():
            p.requires_grad_(True)

    def detach(self) -> None:
        self.snapshot.restore()
        super().detach()

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}
