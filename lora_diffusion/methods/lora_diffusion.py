"""LoRA-Diffusion: low-rank perturbations of the denoising trajectory.

At every denoising step the frozen base gives final hidden states h_t; the logits are
read from h_t + delta_t with

    delta_t = sigma(phase(t)) * sum_{i=1..k} g_i(h_t, t, c)
    g_i(h, t, c) = A_i(c) ReLU(B_i [h ; e(t)]),   A_i(c) = W_A,i diag(1 + gamma_i(c)),
    gamma_i(c) = W_gamma,i Enc(c)

In code B_i is `down`, W_A,i is `up` and W_gamma,i is `gate` (of a `TrajectoryModule`).

* B_i: (d + d_t) -> r, e(t) a sinusoidal embedding + MLP;
* W_A,i: r -> d, zero at init, so the adapted model starts equal to the base;
* Enc(c): mean of the frozen base's word embeddings of the instruction; conditioning
  only rescales the r directions, so rank(A_i(c)) <= r for every c;
* phases (`diffusion.PHASES`): early t > 2/3, middle 1/3 < t <= 2/3, late t <= 1/3, each
  with its own k modules shared by the steps inside it; default ranks 64/32/8, scales
  1/0.5/0.25;
* regularisers: lambda_rank * sum(||up||_* + ||down||_*), lambda_orth * sum_{i != j}
  ||up_i^T up_j||_F^2 inside a phase;
* injection `final` (default): one perturbation after the last block; the base runs
  without a graph, so training has no backward pass through it. `blocks`: one set of
  phase modules after every block (the last one is `final`'s), acting on the positions
  being denoised, so later blocks attend to the prompt from perturbed queries; backward
  through the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import PHASES, StepContext, phase_of
from ..errors import UserError
from .base import Method, MethodConfig, freeze, option

RANK_SCHEDULES = {"adaptive": (64, 32, 8), "inverted": (8, 32, 64)}


@dataclass
class LoRADiffusionConfig(MethodConfig):
    method = "lora_diffusion"
    schedule: str = option("adaptive", "ranks per phase: adaptive 64/32/8, inverted 8/32/64, or uniform "
                                       "(every phase at `rank`)", choices=("adaptive", "inverted", "uniform"))
    ranks: tuple[int, int, int] | None = option(None, "ranks of the early, middle and late phase; none = "
                                                      "from the schedule", min=1)
    rank: int = option(32, "the rank of every phase with schedule=uniform", min=1)
    scales: tuple[float, float, float] = option((1.0, 0.5, 0.25), "scale sigma of the early, middle and late "
                                                                  "phase's perturbation")
    k: int = option(2, "modules per phase", min=1)
    time_dim: int = option(64, "width d_t of the time embedding (even)", min=2)
    lambda_rank: float = option(0.01, "weight of the nuclear-norm rank penalty", min=0.0)
    lambda_orth: float = option(0.001, "weight of the orthogonality penalty between a phase's modules", min=0.0)
    injection: str = option("final", "where delta acts: after the last block, or after every block",
                            choices=("final", "blocks"))
    condition: bool = option(True, "gate the rank directions by the instruction")
    calibrate: bool = option(True, "standardise h with statistics of the first batch (saved)")
    rank_penalty: str = option("proximal", "apply the rank penalty as a proximal step after each "
                                           "optimiser step, or as a loss term", choices=("proximal", "loss"))

    def check(self) -> None:
        if self.time_dim % 2:
            raise UserError(f"method 'lora_diffusion' option 'time_dim' must be even, not {self.time_dim}")

    def phase_ranks(self) -> tuple[int, int, int]:
        """The ranks of the early, middle and late phase: `ranks`, else the schedule's."""
        if self.ranks is not None:
            return self.ranks
        return (self.rank,) * 3 if self.schedule == "uniform" else RANK_SCHEDULES[self.schedule]

    def default_lr(self) -> float:
        # Adam moves every site by ~lr per step, and a perturbation inside the body is
        # amplified by the blocks after it: 3e-3 diverged and 1e-3 stayed at chance on
        # 64 SST-2 examples it should memorise; 3e-4 fits them.
        return 3e-3 if self.injection == "final" else 3e-4


@torch.no_grad()
def encode_instruction(backbone, instruction: torch.Tensor) -> torch.Tensor:
    """Enc(c): mean of the frozen base's word embeddings of the instruction tokens [B, Li] -> [B, d_c].

    Standardised over its d_c features (a LayerNorm without parameters): raw means of word
    embeddings have a norm of ~0.5 for MiniLM (~0.05 for a random tiny model), which left
    the gate and the router nearly blind to the instruction for hundreds of steps.
    """
    keep = (instruction != backbone.pad_id).unsqueeze(-1).float()
    emb = backbone.word_embeddings(instruction).float()
    mean = (emb * keep).sum(1) / keep.sum(1).clamp(min=1)
    return F.layer_norm(mean, mean.shape[-1:])


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by a two-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        features = torch.cat([angles.sin(), angles.cos()], -1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class TrajectoryModule(nn.Module):
    """One g_i: A_i(c) ReLU(B_i [h ; e(t)])."""

    def __init__(self, d: int, d_t: int, d_c: int, r: int):
        super().__init__()
        self.d = d
        self.down = nn.Linear(d + d_t, r)        # B_i: Kaiming-uniform (nn.Linear's default)
        self.up = nn.Linear(r, d, bias=False)    # W_A,i
        self.gate = nn.Linear(d_c, r)            # W_gamma,i
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.gate.weight)         # gamma = 0 at init: A(c) = W_A
        nn.init.zeros_(self.gate.bias)

    def forward(self, h, e, c):
        # B [h ; e] = B_h h + B_e e: the time part is one vector per example.
        w = self.down.weight
        z = F.linear(h, w[:, :self.d]) + F.linear(e, w[:, self.d:], self.down.bias)[:, None, :]
        z = F.relu(z)
        if c is not None:
            z = z * (1 + self.gate(c))[:, None, :]
        return self.up(z)


class PhaseModules(nn.Module):
    """The k modules of each of the three phases at one injection site.

    `h_mean` / `h_std` standardise h per dimension before the modules see it. The base's
    hidden states at the positions it predicts vary across inputs by a few hundredths
    around means ten times larger, so B [h ; e(t)] starts out nearly constant; the
    statistics are taken once, from the first batch the site sees (`calibrate`), and
    saved with the adapter. Standardising only rescales B's input: the family of
    functions is the one defined at the top of this module.
    """

    def __init__(self, d, d_t, d_c, ranks, k):
        super().__init__()
        self.phases = nn.ModuleList(
            nn.ModuleList(TrajectoryModule(d, d_t, d_c, r) for _ in range(k)) for r in ranks)
        self.register_buffer("h_mean", torch.zeros(d))
        self.register_buffer("h_std", torch.ones(d))
        self.register_buffer("calibrated", torch.tensor(False))

    @torch.no_grad()
    def calibrate(self, h: torch.Tensor) -> None:
        rows = h.reshape(-1, h.shape[-1]).float()
        self.h_mean.copy_(rows.mean(0))
        self.h_std.copy_(rows.std(0).clamp(min=1e-3) if len(rows) > 1 else torch.ones_like(self.h_std))
        self.calibrated.fill_(True)

    def forward(self, h, e, c, phase, scales):
        h = (h - self.h_mean.to(h.dtype)) / self.h_std.to(h.dtype)
        delta = None
        for p, modules in enumerate(self.phases):
            rows = (phase == p).nonzero().flatten()
            if len(rows) == 0:
                continue
            if len(rows) == len(phase):  # the whole batch is in this phase (always, when sampling)
                return scales[p] * sum(g(h, e, c) for g in modules)
            part = scales[p] * sum(g(h[rows], e[rows], None if c is None else c[rows]) for g in modules)
            delta = (torch.zeros_like(h, dtype=part.dtype) if delta is None else delta).index_copy(0, rows, part)
        return delta


class LoRADiffusion(Method):
    name = "lora_diffusion"
    Config = LoRADiffusionConfig

    def attach(self, model) -> None:
        self.add_modules(model)
        if self.config.injection == "final":
            self.hooks.append(model.add_step_hook(self._final_hook))
        else:
            model.grad_through_body = True
            for i, block in enumerate(model.backbone.blocks()):
                self.hooks.append(block.register_forward_hook(self._block_hook(i)))

    def add_modules(self, model, module_name: str = "trajectory") -> None:
        """Build the modules under `model.<module_name>`, without hooking them in (a router mixes them)."""
        self.model, self.module_name = model, module_name
        backbone = model.backbone
        self._remember_requires_grad(backbone.mlm)
        freeze(backbone.mlm)
        c = self.config
        d, d_c = backbone.hidden_size, backbone.word_embeddings.embedding_dim
        n_sites = 1 if c.injection == "final" else len(backbone.blocks())
        trajectory = nn.Module()
        trajectory.time = TimeEmbedding(c.time_dim)
        trajectory.sites = nn.ModuleList(PhaseModules(d, c.time_dim, d_c, c.phase_ranks(), c.k) for _ in range(n_sites))
        trajectory.register_buffer("scales", torch.tensor(c.scales), persistent=False)
        self.trajectory = trajectory.to(next(backbone.parameters()).device)
        model.add_module(module_name, self.trajectory)

    def detach(self) -> None:
        delattr(self.model, self.module_name)
        self.model.grad_through_body = False
        super().detach()

    def instruction_encoding(self, instruction):
        """Enc(c) when the method is conditioned on the instruction, else None."""
        if instruction is None or not self.config.condition:
            return None
        return encode_instruction(self.model.backbone, instruction)

    def perturbation(self, site: int, h, t, instruction, positions=None):
        """delta_t at one injection site, for hidden states h [B, L, d] at times t [B].

        `positions` [B, L] marks where logits are read; the first call calibrates the
        site's standardisation on h there.
        """
        modules = self.trajectory.sites[site]
        if self.config.calibrate and not bool(modules.calibrated):
            modules.calibrate(h[positions] if positions is not None and positions.any() else h)
        t = t.to(h.device).float()
        e = self.trajectory.time(t)
        c = self.instruction_encoding(instruction)
        return modules(h, e, c, phase_of(t), self.trajectory.scales)

    def _final_hook(self, h, context: StepContext):
        return self.perturbation(0, h, context.t, context.instruction, context.positions)

    def _block_hook(self, site: int):
        def hook(module, args, output):
            t, instruction, positions = self.model.step_context
            h = output[0] if isinstance(output, tuple) else output
            delta = self.perturbation(site, h, t, instruction, positions).to(h.dtype)
            # Only the positions being denoised move, as with `final`: the prompt's tokens
            # differ from them in scale, and perturbing them with modules calibrated on the
            # response blew them up (measured: SST-2 at chance, outputs no label).
            h = h + (delta if positions is None else delta * positions.unsqueeze(-1).to(h.dtype))
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return hook

    # Tensor names in the adapter file are "trajectory.<...>", whatever the module is called
    # on the model (a router holds several, as task_0, task_1, ...).
    def trainable_parameters(self):
        return {f"trajectory.{n}": p for n, p in self.trajectory.named_parameters()}

    def buffers(self):
        if not self.config.calibrate:
            return {}
        return {f"trajectory.{n}": b for n, b in self.trajectory.named_buffers() if n.split(".")[-1] in
                ("h_mean", "h_std", "calibrated")}

    def modules_by_phase(self):
        """[(site, phase, [TrajectoryModule, ...])] for every site and phase."""
        return [(s, PHASES[p], list(mods)) for s, site in enumerate(self.trajectory.sites)
                for p, mods in enumerate(site.phases)]

    def regularization(self):
        """The orthogonality term (and the nuclear norms, with rank_penalty="loss") for the loss."""
        c = self.config
        in_loss = c.lambda_rank if c.rank_penalty == "loss" else 0.0
        if not (in_loss or c.lambda_orth):
            return None
        device_type = next(self.trajectory.parameters()).device.type
        with torch.autocast(device_type, enabled=False):  # SVDs in fp32
            total = 0.0
            for _, _, modules in self.modules_by_phase():
                if in_loss:
                    total = total + in_loss * _nuclear_norm(modules)
                if c.lambda_orth:
                    for overlap in _pairwise_overlaps(modules):
                        total = total + c.lambda_orth * overlap
        return total if torch.is_tensor(total) else None  # k = 1: no pair to keep orthogonal

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """rank_penalty="proximal": the proximal step of lr * lambda_rank * ||W||_* for `up` and `down`.

        Singular-value soft thresholding, the exact minimiser of the penalty's linearised
        objective (as AdamW decouples weight decay). Put through Adam instead, the
        penalty's gradient U V^T is normalised to steps of size lr whatever lambda is,
        and it drives B to zero within tens of steps while W_A still has no task gradient.
        """
        c = self.config
        if c.rank_penalty != "proximal" or not c.lambda_rank:
            return
        threshold = lr * c.lambda_rank
        for _, _, modules in self.modules_by_phase():
            for g in modules:
                for w in (g.up.weight, g.down.weight):
                    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
                    w.copy_((u * (s - threshold).clamp(min=0)) @ vh)

    def nuclear_norms(self) -> float:
        """sum over modules of ||up||_* + ||down||_* (the rank penalty before lambda)."""
        with torch.no_grad():
            return float(sum(_nuclear_norm(mods) for _, _, mods in self.modules_by_phase()))

    def formula(self) -> dict:
        """Per phase k ((d + d_t) r + r d + d_c r + 2 r) per site, plus the time MLP 2 (d_t^2 + d_t)."""
        c = self.config
        backbone = self.model.backbone
        d, d_c, d_t, k = backbone.hidden_size, backbone.word_embeddings.embedding_dim, c.time_dim, c.k
        sites = len(self.trajectory.sites)
        per_phase = {phase: k * ((d + d_t) * r + r * d + d_c * r + 2 * r) for phase, r in zip(PHASES, c.phase_ranks())}
        time_mlp = 2 * (d_t * d_t + d_t)
        return {"formula": "sites * sum_phases k*((d + d_t)*r + r*d + d_c*r + 2r) + 2*(d_t^2 + d_t)",
                "terms": {"d": d, "d_t": d_t, "d_c": d_c, "k": k, "ranks": list(c.phase_ranks()), "sites": sites,
                          "per_phase": per_phase, "time_mlp": time_mlp},
                "formula_total": sites * sum(per_phase.values()) + time_mlp}


def _nuclear_norm(modules) -> torch.Tensor:
    """sum over the modules of ||up||_* + ||down||_* (svdvals has stable gradients, also at up = 0)."""
    return sum(torch.linalg.matrix_norm(g.up.weight.float(), ord="nuc")
               + torch.linalg.matrix_norm(g.down.weight.float(), ord="nuc") for g in modules)


def _pairwise_overlaps(modules):
    """||up_i^T up_j||_F^2 for every ordered pair i != j of a phase's modules."""
    for i, gi in enumerate(modules):
        for j, gj in enumerate(modules):
            if i != j:
                yield (gi.up.weight.float().T @ gj.up.weight.float()).pow(2).sum()
