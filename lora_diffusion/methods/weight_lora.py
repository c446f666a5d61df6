"""Weight LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024), through `peft`.

W' = W + (alpha / r) B A on the attention projections q, k, v, o of every block
(`targets="attention+mlp"` adds the two MLP projections). B starts at zero, so the
adapted model starts equal to the base. Both merge into the base weights for
inference (peft's `merge_adapter`), and the adapter is also written in peft's own
layout so `peft.PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import UserError
from .base import Method

TARGETS = {"attention": ("q", "k", "v", "o"), "attention+mlp": ("q", "k", "v", "o", "ffn_in", "ffn_out")}


class WeightLoRA(Method):
    name = "lora"
    default_lr = 2e-3
    can_merge = True
    use_dora = False

    def __init__(self, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 targets: str = "attention"):
        if targets not in TARGETS:
            raise UserError(f"{self.name} targets must be one of {', '.join(TARGETS)}, not {targets!r}")
        if r < 1:
            raise UserError(f"{self.name} rank r must be at least 1")
        alpha = float(alpha) if alpha is not None else 2.0 * r  # the common alpha = 2r
        super().__init__(r=int(r), alpha=alpha, dropout=float(dropout), targets=targets)
        self.peft_model = None

    def attach(self, model) -> None:
        from peft import LoraConfig, get_peft_model

        self.model = model
        backbone = model.backbone
        config = LoraConfig(r=self.options["r"], lora_alpha=self.options["alpha"],
                            lora_dropout=self.options["dropout"], use_dora=self.use_dora,
                            target_modules=backbone.projection_pattern(*TARGETS[self.options["targets"]]))
        # Wraps the masked LM in place: the LoRA layers replace the targeted Linear layers
        # inside backbone.body, and every base weight is frozen.
        with warnings.catch_warnings():  # a deprecation inside peft, not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            self.peft_model = get_peft_model(backbone.mlm, config)

    def trainable_parameters(self):
        return {n: p for n, p in self.model.backbone.mlm.named_parameters() if p.requires_grad}

    def formula(self) -> dict:
        """sum over adapted (d_out x d_in) weights of r (d_in + d_out) [+ d_out magnitudes for DoRA]."""
        from peft.tuners.lora import LoraLayer

        r, terms = self.options["r"], {}
        for name, module in self.model.backbone.mlm.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                n = r * (base.in_features + base.out_features) + (base.out_features if self.use_dora else 0)
                terms[name.split("base_model.model.")[-1]] = n
        return {"formula": "sum_W r*(d_in + d_out)" + (" + d_out (magnitude)" if self.use_dora else ""),
                "formula_total": sum(terms.values()), "adapted_weights": len(terms)}

    def merge(self) -> None:
        if not self.merged:
            self.peft_model.merge_adapter()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.peft_model.unmerge_adapter()
            self.merged = False

    def save_peft(self, folder) -> None:
        """peft's own layout: adapter_config.json + adapter_model.safetensors."""
        if self.merged:
            raise UserError("unmerge the adapter before saving it in peft's layout")
        self.peft_model.save_pretrained(str(Path(folder)), safe_serialization=True)


class DoRA(WeightLoRA):
    """Weight-decomposed LoRA: W' = m * (W + B A) / ||W + B A|| (column norms), m trained."""

    name = "dora"
    use_dora = True
