"""Weight LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024), through `peft`.

W' = W + (alpha / r) B A on the attention projections q, k, v, o of every block
(`targets="attention+mlp"` adds the two MLP projections). B starts at zero, so the
adapted model starts equal to the base. Both merge into the base weights for
inference (peft's `merge_adapter`), and the adapter is also written in peft's own
layout so `peft.PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from ..errors import UserError
from .base import BaseSnapshot, Method, MethodConfig, option

TARGETS = {"attention": ("q", "k", "v", "o"), "attention+mlp": ("q", "k", "v", "o", "ffn_in", "ffn_out")}


@dataclass
class LoRAConfig(MethodConfig):
    method = "lora"
    r: int = option(16, "rank r of the update B A of each adapted weight", min=1, max=1024)
    alpha: float | None = option(None, "scale numerator: the update is (alpha / r) B A; none = 2r")
    dropout: float = option(0.0, "dropout on the adapter's input during training", min=0.0, max=1.0)
    targets: str = option("attention", "which projections to adapt", choices=tuple(TARGETS))

    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r  # the common alpha = 2r

    def default_lr(self) -> float:
        return 2e-3


@dataclass
class DoRAConfig(LoRAConfig):
    method = "dora"


class WeightLoRA(Method):
    name = "lora"
    Config = LoRAConfig
    can_merge = True
    use_dora = False

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        config = self.peft_config(backbone)
        self._remember_requires_grad(backbone.mlm)
        # Wraps the masked LM in place: the LoRA layers replace the targeted Linear layers
        # inside backbone.body, and every base weight is frozen.
        with warnings.catch_warnings():  # a deprecation inside peft, not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            self.peft_model = get_peft_model(backbone.mlm, config)

    def peft_config(self, backbone) -> LoraConfig:
        """This adapter's options as peft's LoraConfig for `backbone`."""
        c = self.config
        return LoraConfig(r=c.r, lora_alpha=c.lora_alpha(), lora_dropout=c.dropout, use_dora=self.use_dora,
                          target_modules=backbone.projection_pattern(*TARGETS[c.targets]))

    def detach(self) -> None:
        """Take the LoRA layers out again (peft's `unload`), unmerging first if merged."""
        self.unmerge()
        self.peft_model.unload()
        self.peft_model = None
        super().detach()

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}

    def formula(self) -> dict:
        """sum over adapted (d_out x d_in) weights of r (d_in + d_out) [+ d_out magnitudes for DoRA]."""
        r, terms = self.config.r, {}
        for name, module in self.model.backbone.mlm.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                n = r * (base.in_features + base.out_features) + (base.out_features if self.use_dora else 0)
                terms[name.split("base_model.model.")[-1]] = n
        return {"formula": "sum_W r*(d_in + d_out)" + (" + d_out (magnitude)" if self.use_dora else ""),
                "formula_total": sum(terms.values()), "adapted_weights": len(terms)}

    def merge(self) -> None:
        if not self.merged:
            # W + BA - BA is not W in floating point: keep the adapted weights to put back exactly.
            self.premerge = BaseSnapshot({name: module.get_base_layer().weight for name, module in
                                          self.model.backbone.mlm.named_modules() if isinstance(module, LoraLayer)})
            self.peft_model.merge_adapter()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.peft_model.unmerge_adapter()
            self.premerge.restore()
            self.premerge = None
            self.merged = False

    def save_peft(self, folder) -> None:
        """peft's own layout: adapter_config.json + adapter_model.safetensors."""
        if self.merged:
            raise UserError("unmerge the adapter before saving it in peft's layout")
        self.peft_model.save_pretrained(str(Path(folder)), safe_serialization=True)


class DoRA(WeightLoRA):
    """Weight-decomposed LoRA: W' = m * (W + B A) / ||W + B A|| (column norms), m trained."""

    name = "dora"
    Config = DoRAConfig
    use_dora = True
