"""Bottleneck adapters (Houlsby et al., 2019), the method named `adapter` on the command line.

Two adapters per block, right after the attention output projection and after the MLP
output projection (before the residual add and LayerNorm, as in the paper):
x -> x + W_up GELU(W_down x), bottleneck m. W_up starts at zero, so the adapted model
starts equal to the base. Houlsby also trains the LayerNorms; `train_layernorm`
switches that off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import BaseSnapshot, Method, MethodConfig, freeze, option


@dataclass
class HoulsbyConfig(MethodConfig):
    method = "adapter"
    bottleneck: int = option(32, "bottleneck width m of each adapter", min=1, max=4096)
    train_layernorm: bool = option(True, "also train the base's LayerNorms, as Houlsby does")

    def default_lr(self) -> float:
        return 1e-3


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.gelu(self.down(x)))


class AfterProjection(nn.Module):
    """A projection followed by its bottleneck; stands where the projection stood."""

    def __init__(self, projection: nn.Linear, bottleneck: Bottleneck):
        super().__init__()
        self.projection = projection
        self.adapter = bottleneck

    def forward(self, x):
        return self.adapter(self.projection(x))


class Houlsby(Method):
    name = "adapter"
    Config = HoulsbyConfig

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        self._remember_requires_grad(backbone.mlm)
        freeze(backbone.mlm)
        pattern = re.compile(backbone.projection_pattern("o", "ffn_out"))
        targets = [name for name, module in backbone.body.named_modules()
                   if pattern.fullmatch(name) and isinstance(module, nn.Linear)]
        if not targets:
            raise UserError(f"no attention/MLP output projections found in {backbone.source}")
        self.wrapped = []  # (parent, child name, original projection), for detach
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = backbone.body.get_submodule(parent_name)
            projection = getattr(parent, child)
            bottleneck = Bottleneck(projection.out_features, self.config.bottleneck)
            setattr(parent, child, AfterProjection(projection, bottleneck.to(projection.weight.device)))
            self.wrapped.append((parent, child, projection))
        layernorms = {f"{name}.{pname}": p for name, module in backbone.body.named_modules()
                      if isinstance(module, nn.LayerNorm) for pname, p in module.named_parameters()}
        self.snapshot = BaseSnapshot(layernorms if self.config.train_layernorm else {})
        for p in self.snapshot.params.values():
            p.requires_grad_(True)

    def detach(self) -> None:
        for parent, child, projection in self.wrapped:
            setattr(parent, child, projection)
        self.wrapped = []
        self.snapshot.restore()
        super().detach()

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}

    def formula(self) -> dict:
        d, m = self.model.backbone.hidden_size, self.config.bottleneck
        per_adapter = 2 * d * m + m + d
        layernorm = sum(p.numel() for n, p in self.trainable_parameters().items() if ".adapter." not in n)
        n_adapters = len(self.wrapped)
        return {"formula": "n_adapters * (2*d*m + m + d) + LayerNorm parameters",
                "terms": {"n_adapters": n_adapters, "per_adapter": per_adapter, "layernorm": layernorm},
                "formula_total": n_adapters * per_adapter + layernorm}
