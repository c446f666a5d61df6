"""Step-aware LoRA: the two rivals of LoRA-Diffusion that make a weight update depend on t.

Both adapt the same projections as weight LoRA (q, k, v, o; `targets="attention+mlp"` adds
the two MLP projections) with an update that changes along the denoising trajectory:

    W(t) = W + (alpha / r) B core(t) A      A: r x d_in, B: d_out x r, core(t): r x r

* `nara`, NaRA-style noise-conditioned LoRA (Wang et al., ICML 2026, arXiv 2605.29716):
  core(t) = C(t) = I_r + H(e(t)), an r x r matrix from ONE small hypernetwork H shared by
  every adapted projection, fed a sinusoidal embedding e(t) of the step's time. Its last
  layer starts at zero, so C(t) = I at init: NaRA starts as exactly LoRA.
* `tlora`, T-LoRA-style timestep rank masking (Soboleva et al., 2025): core(t) = M(t), the
  diagonal 0/1 mask of the first r(t) = floor((r - r_min)(1 - t)) + r_min ranks. At high
  noise (t near 1) only r_min ranks act, at t = 0 all r do. (The paper's Ortho-LoRA
  initialisation is left out: B starts at zero here as in every other method.)

B starts at zero, so the adapted model starts equal to the base. t is one value per
example (`DiffusionLM.step_context.t`, set for every denoising step, in training and in
the sampler), so core(t) is one matrix per example, [B, r, r], applied between A and B.

Neither merges into the base weights (`can_merge = False`): the update differs from step
to step and, in a training batch, from example to example, so no single W' stands for it.
(The sampler gives every row the same t, so a per-step merge would be possible; it would
rebuild every adapted weight at every step, which is what the unmerged form avoids.)

How it is wired: forward hooks on the targeted `nn.Linear`s add the low-rank term to their
output, and a pre-hook on the body computes core(t) once per denoising step for all of
them. The base's modules are never replaced, so removing the hooks (`detach`) gives back
exactly the base. The factors and the hypernetwork live in one module under the
`DiffusionLM`, named after the method (`nara.*`, `tlora.*` in the adapter file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Method, MethodConfig, freeze, option
from .lora_diffusion import TimeEmbedding
from .weight_lora import TARGETS


@dataclass
class StepLoRAConfig(MethodConfig):
    """The options both step-aware variants share with weight LoRA."""

    r: int = option(16, "rank r of the update B core(t) A of each adapted weight", min=1, max=1024)
    alpha: float | None = option(None, "scale numerator: the update is (alpha / r) B core(t) A; none = 2r")
    targets: str = option("attention", "which projections to adapt", choices=tuple(TARGETS))

    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r  # as weight LoRA's config

    def default_lr(self) -> float:
        return 2e-3  # weight LoRA's: both start as (a masked) LoRA


MAX_HYPERNETWORK_OUT = 2**24  # weights of NaRA's last hypernetwork layer: 64 MB in float32


@dataclass
class NaRAConfig(StepLoRAConfig):
    method = "nara"
    time_dim: int = option(32, "width of the sinusoidal embedding e(t) the hypernetwork reads (even)", min=2, max=1024)
    hidden: int = option(64, "hidden width of the shared hypernetwork e(t) -> C(t)", min=1, max=4096)

    def check(self) -> None:
        if self.time_dim % 2:
            raise UserError(f"method 'nara' option 'time_dim' must be even, not {self.time_dim}")
        if self.hidden * self.r * self.r > MAX_HYPERNETWORK_OUT:  # its last layer is hidden x r^2
            raise UserError(f"method 'nara' options hidden * r^2 must be at most {MAX_HYPERNETWORK_OUT:,}, "
                            f"not {self.hidden * self.r * self.r:,}; lower r or hidden")


@dataclass
class TLoRAConfig(StepLoRAConfig):
    method = "tlora"
    r_min: int | None = option(None, "ranks still active at the highest noise (t = 1); none = r // 4 "
                                     "(at least 1)", min=1)

    def check(self) -> None:
        if self.r_min is not None and self.r_min > self.r:
            raise UserError(f"method 'tlora' option 'r_min' must be at most r = {self.r}, not {self.r_min}")

    def min_rank(self) -> int:
        return self.r_min if self.r_min is not None else max(1, self.r // 4)


class Factors(nn.Module):
    """A and B of one adapted projection: A Kaiming-uniform (as LoRA's), B zero."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class Hypernetwork(TimeEmbedding):
    """NaRA's H: t -> C(t) - I, flattened [B, r * r].

    TimeEmbedding's sinusoid of t, then an MLP of its own (time_dim -> hidden -> r * r) in
    place of TimeEmbedding's; the last layer starts at zero, so C(t) = I at init.
    """

    def __init__(self, time_dim: int, hidden: int, r: int):
        super().__init__(time_dim)
        self.mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, r * r))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)


class StepLoRA(Method):
    """What both variants share: the factors, the hooks, attach/detach and the accounting.

    A variant says what core(t) is (`core`) and may add modules of its own (`add_modules`).
    """

    Config = StepLoRAConfig

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        self._remember_requires_grad(backbone.mlm)
        freeze(backbone.mlm)
        projections = backbone.projections(*TARGETS[self.config.targets])
        r = self.config.r
        adapter = nn.Module()
        adapter.factors = nn.ModuleDict({_key(name): Factors(linear.in_features, linear.out_features, r)
                                         for name, linear in projections.items()})
        self.add_modules(adapter)
        self.adapter = adapter.to(next(backbone.parameters()).device)
        model.add_module(self.name, self.adapter)
        model.grad_through_body = True  # the factors act inside the (frozen) body
        self.scale = self.config.lora_alpha() / r
        self.hooks.append(backbone.body.register_forward_pre_hook(self._compute_core))
        for name, linear in projections.items():
            self.hooks.append(linear.register_forward_hook(self._add_update(self.adapter.factors[_key(name)])))

    def add_modules(self, adapter: nn.Module) -> None:
        """Trainable modules of the variant besides the factors (NaRA's hypernetwork)."""

    def core(self, t: torch.Tensor) -> torch.Tensor:
        """core(t) [B, r, r] for the step times t [B]."""
        raise NotImplementedError

    def _compute_core(self, body, args) -> None:
        """Once per denoising step, before the body runs: core(t) for every adapted projection."""
        context = self.model.step_context
        if context is None:
            raise UserError(f"method {self.name!r} acts at a denoising step: run the model through "
                            "DiffusionLM (which gives it t), not the backbone alone")
        self.current_core = self.core(context.t.float().clamp(0.0, 1.0))

    def _add_update(self, factors: Factors):
        def hook(linear, args, output):
            x, core = args[0], self.current_core
            if x.shape[0] != core.shape[0]:
                raise UserError(f"method {self.name!r}: a batch of {x.shape[0]} but t for {core.shape[0]} examples")
            z = F.linear(x, factors.A)                                 # A x [B, ..., r]
            z = torch.einsum("b...j,bij->b...i", z, core.to(z.dtype))  # core(t) A x, each row its own core
            return output + (self.scale * F.linear(z, factors.B)).to(output.dtype)
        return hook

    def detach(self) -> None:
        delattr(self.model, self.name)
        self.model.grad_through_body = False
        self.current_core = None
        super().detach()

    # Tensor names in the adapter file: "<method>.factors.<projection>.A", "nara.hypernetwork...."
    def trainable_parameters(self):
        return {f"{self.name}.{n}": p for n, p in self.adapter.named_parameters()}

    def formula(self) -> dict:
        """sum over adapted (d_out x d_in) weights of r (d_in + d_out), plus the variant's extra terms."""
        r = self.config.r
        factors = sum(r * (f.A.shape[1] + f.B.shape[0]) for f in self.adapter.factors.values())
        extra, extra_formula = self.extra_parameters()
        return {"formula": "sum_W r*(d_in + d_out)" + extra_formula,
                "terms": {"r": r, "factors": factors, **extra},
                "formula_total": factors + sum(extra.values()), "adapted_weights": len(self.adapter.factors)}

    def extra_parameters(self) -> tuple[dict, str]:
        """({term: count}, " + formula") of the variant's own parameters besides the factors."""
        return {}, ""


class NaRA(StepLoRA):
    """core(t) = C(t) = I + H(e(t)), one shared hypernetwork H for every adapted weight."""

    name = "nara"
    Config = NaRAConfig

    def add_modules(self, adapter: nn.Module) -> None:
        adapter.hypernetwork = Hypernetwork(self.config.time_dim, self.config.hidden, self.config.r)

    def core(self, t: torch.Tensor) -> torch.Tensor:
        r = self.config.r
        eye = torch.eye(r, device=t.device)
        return eye + self.adapter.hypernetwork(t).float().view(-1, r, r)

    def extra_parameters(self) -> tuple[dict, str]:
        c = self.config
        return ({"hypernetwork": c.time_dim * c.hidden + c.hidden + c.hidden * c.r * c.r + c.r * c.r},
                " + (d_t*hidden + hidden) + (hidden*r^2 + r^2)")


class TLoRA(StepLoRA):
    """core(t) = M(t): the first r(t) = floor((r - r_min)(1 - t)) + r_min ranks."""

    name = "tlora"
    Config = TLoRAConfig

    def active_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """r(t) per example, from r_min at t = 1 to r at t = 0."""
        r, r_min = self.config.r, self.config.min_rank()
        # + 1e-6: (1 - t) * (r - r_min) that should be a whole number can land just below it in
        # float32 (t = 1/3, r - r_min = 12 gives 7.9999995), which would drop a rank.
        return torch.floor((r - r_min) * (1 - t) + 1e-6).long() + r_min

    def core(self, t: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(self.config.r, device=t.device)[None, :] < self.active_ranks(t)[:, None]
        return torch.diag_embed(keep.float())


def _key(name: str) -> str:
    """A projection's name as a module key (keys may not hold dots): encoder_layer_0_attention_self_query."""
    return name.replace(".", "_")
