"""Bottleneck adapters (Houlsby et al., 2019).

Two adapters per block, right after the attention output projection and after the MLP
output projection (before the residual add and LayerNorm, as in the paper):
x -> x + W_up GELU(W_down x), bottleneck m. W_up starts at zero, so the adapted model
starts equal to the base. Houlsby also trains the LayerNorms; `train_layernorm`
switches that off.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Method, freeze


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
    """A projection followed by its adapter; stands where the projection stood."""

    def __init__(self, projection: nn.Linear, adapter: Bottleneck):
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, x):
        return self.adapter(self.projection(x))


class HoulsbyAdapters(Method):
    name = "adapter"
    default_lr = 1e-3

    def __init__(self, bottleneck: int = 32, train_layernorm: bool = True):
        if bottleneck < 1:
            raise UserError("adapter bottleneck must be at least 1")
        super().__init__(bottleneck=int(bottleneck), train_layernorm=bool(train_layernorm))

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        freeze(backbone.mlm)
        pattern = re.compile(backbone.projection_pattern("o", "ffn_out"))
        targets = [name for name, module in backbone.body.named_modules()
                   if pattern.fullmatch(name) and isinstance(module, nn.Linear)]
        if not targets:
            raise UserError(f"no attention/MLP output projections found in {backbone.source}")
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = backbone.body.get_submodule(parent_name)
            projection = getattr(parent, child)
            adapter = Bottleneck(projection.out_features, self.options["bottleneck"])
            setattr(parent, child, AfterProjection(projection, adapter.to(projection.weight.device)))
        self.n_adapters = len(targets)
        if self.options["train_layernorm"]:
            for module in backbone.body.modules():
                if isinstance(module, nn.LayerNorm):
                    for p in module.parameters():
                        p.requires_grad_(True)

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}

    def formula(self) -> dict:
        d, m = self.model.backbone.hidden_size, self.options["bottleneck"]
        per_adapter = 2 * d * m + m + d
        layernorm = sum(p.numel() for n, p in self.trainable_parameters().items() if ".adapter." not in n)
        return {"formula": "n_adapters * (2*d*m + m + d) + LayerNorm parameters",
                "terms": {"n_adapters": self.n_adapters, "per_adapter": per_adapter, "layernorm": layernorm},
                "formula_total": self.n_adapters * per_adapter + layernorm}
