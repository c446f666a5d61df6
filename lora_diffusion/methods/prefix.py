"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes in every attention layer.

Each layer's self-attention attends to `length` extra key/value vectors before the
sequence's own. By default they come from the reparameterisation of the paper, an MLP
over a small learned embedding: P = P0 + MLP(E), E in R^{length x d}, MLP: d -> hidden
-> 2 L d (tanh). After training only P is needed for inference; the adapter file keeps E
and the MLP so a run can be resumed, and `accounting()` reports both sizes. With
`reparam=False` the prefixes themselves are the parameters (P-tuning v2, Liu et al.
2022), with a default learning rate of 1e-2 as there.

Initialisation (`init`): "words" (default) starts the prefixes at the keys and values the
frozen base computes for real words (P0, a saved buffer) with the MLP's output layer (or
the free prefixes) at zero, as Li & Liang recommend; "random" is P0 = 0 and a
default-initialised MLP (or N(0, 1) prefixes, as an nn.Embedding).

On SST-2 with the shipped base no variant leaves chance within the 600 steps of the
methods table. Given five times longer, the free, randomly initialised prefixes do
(README, "Prefix tuning given longer"): in a single-seed check on the validation split
they sat at the majority label (56%) for about 700 steps, then climbed to 82% by step
3,000, while the reparameterised words start reached only 60%.

The prefixes enter through `transformers`' attention interface: the method registers
an attention function that concatenates them in front of the keys and values (and
widens the padding mask) and then runs the stock SDPA kernel. Every model family that
computes attention through that interface (BERT, RoBERTa, ModernBERT, ...) works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import UserError
from .base import Method, MethodConfig, freeze, option

ATTENTION = "lora_diffusion_prefix"
# Common words whose keys/values the prefixes start from (init="words").
INIT_WORDS = "the of and to in is that it was for on as with his they at be this from have or by one had not but"


def _attention_with_prefix(module, query, key, value, attention_mask, **kwargs):
    capture = getattr(module, "_prefix_capture", None)
    if capture is not None:  # recording the base's own keys/values (the "words" init)
        capture.append((key[0].detach().clone(), value[0].detach().clone()))
    source = getattr(module, "_prefix_source", None)
    if source is not None and capture is None:
        prefix_key, prefix_value = source()  # [H, P, dh] each
        batch, n_prefix = key.shape[0], prefix_key.shape[1]
        key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], 2)
        value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], 2)
        if attention_mask is not None:  # every query attends to every prefix position
            attend = torch.ones((), dtype=torch.bool) if attention_mask.dtype == torch.bool else torch.zeros(())
            pad = attend.to(attention_mask).expand(*attention_mask.shape[:-1], n_prefix)
            attention_mask = torch.cat([pad, attention_mask], -1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    AttentionInterface.register(ATTENTION, _attention_with_prefix)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class PrefixEncoder(nn.Module):
    """Per-layer keys and values [L, 2, H, P, dh]: P0 + MLP(E), or P0 + a free tensor (reparam=False)."""

    def __init__(self, length: int, d: int, hidden: int, n_layers: int, n_heads: int, reparam: bool = True):
        super().__init__()
        self.shape = (length, n_layers, 2, n_heads, d // n_heads)
        self.reparam = reparam
        if reparam:
            self.embedding = nn.Parameter(torch.randn(length, d) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, n_layers * 2 * d))
        else:  # P-tuning v2: the prefixes themselves are the parameters (N(0, 1), as an nn.Embedding)
            self.delta = nn.Parameter(torch.randn(n_layers, 2, n_heads, length, d // n_heads))
        # P0: where the prefixes start (zeros, or the base's keys/values of real words)
        self.register_buffer("start", torch.zeros(n_layers, 2, n_heads, length, d // n_heads))

    def forward(self) -> torch.Tensor:
        if not self.reparam:
            return self.start + self.delta
        return self.start + self.mlp(self.embedding).view(self.shape).permute(1, 2, 3, 0, 4)


@dataclass
class PrefixConfig(MethodConfig):
    method = "prefix"
    length: int = option(16, "prefix positions added to every attention layer", min=1, max=512)
    hidden: int = option(128, "hidden width of the reparameterisation MLP", min=1, max=4096)
    init: str = option("words", "start at the base's keys/values of real words, or at random",
                       choices=("words", "random"))
    reparam: bool = option(True, "prefixes from an MLP over an embedding (Li & Liang); false: the "
                                 "prefixes are the parameters (P-tuning v2)")

    def default_lr(self) -> float:
        return 5e-3 if self.reparam else 1e-2  # free prefixes take larger steps (P-tuning v2's range)


class PrefixTuning(Method):
    name = "prefix"
    Config = PrefixConfig

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        config = backbone.mlm.config
        if config.hidden_size % config.num_attention_heads:
            raise UserError("prefix tuning needs hidden_size divisible by the number of heads")
        self._remember_requires_grad(backbone.mlm)
        freeze(backbone.mlm)
        c = self.config
        self.encoder = PrefixEncoder(c.length, config.hidden_size, c.hidden, config.num_hidden_layers,
                                     config.num_attention_heads, c.reparam)
        model.add_module("prefix_encoder", self.encoder.to(next(backbone.parameters()).device))
        model.grad_through_body = True  # the prefixes act inside the (frozen) body
        self._use_prefix_attention(backbone)
        # Every submodule of block i knows where its prefixes come from; only the
        # attention module ever asks.
        for layer, block in enumerate(backbone.blocks()):
            for module in block.modules():
                module._prefix_source = (lambda i=layer: self._prefix(i))
        # Compute all prefixes once per forward pass of the body.
        self.hooks.append(backbone.body.register_forward_pre_hook(lambda *_: self._compute()))
        if c.init == "words":
            self._start_at_words(backbone)

    def _use_prefix_attention(self, backbone) -> None:
        config = backbone.mlm.config
        self.original_attention = config._attn_implementation
        _register_attention()
        try:
            backbone.mlm.set_attn_implementation(ATTENTION)
        except Exception as err:  # a model family outside the attention interface
            raise UserError(f"prefix tuning needs a model that uses transformers' attention interface; "
                            f"{config.model_type}: {err}") from None
        if config._attn_implementation != ATTENTION:
            raise UserError(f"prefix tuning is not supported for model type {config.model_type!r}")

    def detach(self) -> None:
        backbone = self.model.backbone
        for block in backbone.blocks():
            for module in block.modules():
                del module._prefix_source
        backbone.mlm.set_attn_implementation(self.original_attention)
        del self.model.prefix_encoder
        self.model.grad_through_body = False
        super().detach()

    def _start_at_words(self, backbone) -> None:
        """P0 = the base's keys/values of `length` real words; the MLP starts at zero output."""
        words = backbone.tokenizer(INIT_WORDS, add_special_tokens=False)["input_ids"]
        length = self.config.length
        words = (words * (length // len(words) + 1))[:length]
        device = next(backbone.parameters()).device
        ids = torch.tensor([[backbone.cls_id] + words + [backbone.sep_id]], device=device)
        captured: list = []
        blocks = list(backbone.blocks())
        for block in blocks:
            for module in block.modules():
                module._prefix_capture = captured
        try:
            with torch.no_grad():
                backbone.hidden_states(ids, torch.ones_like(ids))
        finally:
            for block in blocks:
                for module in block.modules():
                    del module._prefix_capture
        if len(captured) != len(blocks):
            raise UserError("prefix init: could not read the base's keys and values")
        with torch.no_grad():
            self.encoder.start.copy_(torch.stack([torch.stack([k[:, 1:-1], v[:, 1:-1]]) for k, v in captured]))
            if self.config.reparam:
                self.encoder.mlp[-1].weight.zero_()
                self.encoder.mlp[-1].bias.zero_()
            else:
                self.encoder.delta.zero_()

    def buffers(self):
        return {"prefix_encoder.start": self.encoder.start}

    def _compute(self) -> None:
        self.current = self.encoder()

    def _prefix(self, layer: int):
        return self.current[layer, 0], self.current[layer, 1]

    def trainable_parameters(self):
        return {f"prefix_encoder.{n}": p for n, p in self.encoder.named_parameters()}

    def formula(self) -> dict:
        hidden = self.config.hidden
        length, n_layers, _, n_heads, head = self.encoder.shape
        d = n_heads * head
        if not self.config.reparam:
            return {"formula": "length*2*L*d", "formula_total": length * 2 * n_layers * d,
                    "inference_parameters": length * 2 * n_layers * d}
        return {"formula": "length*d + (d*hidden + hidden) + (hidden*2*L*d + 2*L*d)",
                "formula_total": length * d + d * hidden + hidden + hidden * 2 * n_layers * d + 2 * n_layers * d,
                "inference_parameters": length * 2 * n_layers * d}
