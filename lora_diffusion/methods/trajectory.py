"""LoRA-Diffusion: low-rank perturbations of the denoising trajectory (DESIGN.md section 2).

At every denoising step the frozen base gives final hidden states h_t; the logits are
read from h_t + delta_t with

    delta_t = sigma(phase(t)) * sum_{i=1..k} g_i(h_t, t, c)
    g_i(h, t, c) = A_i(c) ReLU(B_i [h ; e(t)]),   A_i(c) = W_A,i diag(1 + gamma_i(c)),
    gamma_i(c) = W_gamma,i Enc(c)

* B_i: (d + d_t) -> r (the down projection), e(t) a sinusoidal embedding + MLP;
* W_A,i: r -> d, zero at init, so the adapted model starts equal to the base;
* Enc(c): mean of the frozen base's word embeddings of the instruction; conditioning
  only rescales the r directions, so rank(A_i(c)) <= r for every c;
* phases: early t > 2/3, middle 1/3 < t <= 2/3, late t <= 1/3, each with its own k
  modules shared by the steps inside it; default ranks 64/32/8, scales 1/0.5/0.25;
* regularisers: lambda_rank * sum(||W_A||_* + ||W_B||_*), lambda_orth * sum_{i != j}
  ||W_A,i^T W_A,j||_F^2 inside a phase;
* injection `final` (default): one perturbation after the last block; the base runs
  without a graph, so training has no backward pass through it. `blocks`: one set of
  phase modules after every block (the last one is `final`'s), acting on the positions
  being denoised, so later blocks attend to the prompt from perturbed queries; backward
  through the base.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import Method, freeze

PHASES = ("early", "middle", "late")
RANK_SCHEDULES = {"adaptive": (64, 32, 8), "inverted": (8, 32, 64)}


def phase_of(t: torch.Tensor) -> torch.Tensor:
    """Phase index per example: 0 early (t > 2/3), 1 middle (1/3 < t <= 2/3), 2 late (t <= 1/3)."""
    return (t <= 2 / 3).long() + (t <= 1 / 3).long()


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
    functions is the one of DESIGN.md.
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
    default_lr = 3e-3

    def __init__(self, schedule: str = "adaptive", ranks=None, rank: int = 32, scales=(1.0, 0.5, 0.25),
                 k: int = 2, time_dim: int = 64, lambda_rank: float = 0.01, lambda_orth: float = 0.001,
                 injection: str = "final", condition: bool = True, calibrate: bool = True,
                 rank_penalty: str = "proximal"):
        if ranks is None:
            if schedule == "uniform":
                ranks = (rank,) * 3
            elif schedule in RANK_SCHEDULES:
                ranks = RANK_SCHEDULES[schedule]
            else:
                raise UserError(f"lora_diffusion schedule must be adaptive, inverted or uniform, not {schedule!r}")
        ranks, scales = [int(r) for r in ranks], [float(s) for s in scales]
        if len(ranks) != 3 or len(scales) != 3 or min(ranks) < 1:
            raise UserError("lora_diffusion needs three positive ranks and three scales (early, middle, late)")
        if injection not in ("final", "blocks"):
            raise UserError(f"lora_diffusion injection must be 'final' or 'blocks', not {injection!r}")
        if k < 1 or time_dim < 2 or time_dim % 2:
            raise UserError("lora_diffusion needs k >= 1 and an even time_dim")
        if rank_penalty not in ("proximal", "loss"):
            raise UserError(f"lora_diffusion rank_penalty must be 'proximal' or 'loss', not {rank_penalty!r}")
        super().__init__(schedule=schedule, ranks=ranks,
                         scales=scales, k=int(k), time_dim=int(time_dim), lambda_rank=float(lambda_rank),
                         lambda_orth=float(lambda_orth), injection=injection, condition=bool(condition),
                         calibrate=bool(calibrate), rank_penalty=rank_penalty)
        if injection == "blocks":
            # Adam moves every site by ~lr per step, and a perturbation inside the body is
            # amplified by the blocks after it: 3e-3 diverged and 1e-3 stayed at chance on
            # 64 SST-2 examples it should memorise; 3e-4 fits them.
            self.default_lr = 3e-4

    def attach(self, model) -> None:
        self.model = model
        backbone = model.backbone
        freeze(backbone.mlm)
        o = self.options
        d, d_c = backbone.hidden_size, backbone.word_embeddings.embedding_dim
        n_sites = 1 if o["injection"] == "final" else len(backbone.blocks())
        adapter = nn.Module()
        adapter.time = TimeEmbedding(o["time_dim"])
        adapter.sites = nn.ModuleList(PhaseModules(d, o["time_dim"], d_c, o["ranks"], o["k"]) for _ in range(n_sites))
        adapter.register_buffer("scales", torch.tensor(o["scales"]), persistent=False)
        self.adapter = adapter.to(next(backbone.parameters()).device)
        model.add_module("trajectory", self.adapter)
        if o["injection"] == "final":
            model.step_hook = self._final_hook
        else:
            model.grad_through_body = True
            for i, block in enumerate(backbone.blocks()):
                block.register_forward_hook(self._block_hook(i))

    def instruction_encoding(self, instruction):
        """Enc(c) when the method is conditioned on the instruction, else None."""
        if instruction is None or not self.options["condition"]:
            return None
        return encode_instruction(self.model.backbone, instruction)

    def perturbation(self, site: int, h, t, instruction, positions=None):
        """delta_t at one injection site, for hidden states h [B, L, d] at times t [B].

        `positions` [B, L] marks where logits are read; the first call calibrates the
        site's standardisation on h there.
        """
        modules = self.adapter.sites[site]
        if self.options["calibrate"] and not bool(modules.calibrated):
            modules.calibrate(h[positions] if positions is not None and positions.any() else h)
        t = t.to(h.device).float()
        e = self.adapter.time(t)
        c = self.instruction_encoding(instruction)
        return modules(h, e, c, phase_of(t), self.adapter.scales)

    def _final_hook(self, h, t, instruction):
        return self.perturbation(0, h, t, instruction, self.model.step_context[2])

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

    def trainable_parameters(self):
        return {f"trajectory.{n}": p for n, p in self.adapter.named_parameters()}

    def buffers(self):
        if not self.options["calibrate"]:
            return {}
        return {f"trajectory.{n}": b for n, b in self.adapter.named_buffers() if n.split(".")[-1] in
                ("h_mean", "h_std", "calibrated")}

    def modules_by_phase(self):
        """[(site, phase, [TrajectoryModule, ...])] for every site and phase."""
        return [(s, PHASES[p], list(mods)) for s, site in enumerate(self.adapter.sites)
                for p, mods in enumerate(site.phases)]

    def regularization(self):
        """The orthogonality term (and the nuclear norms, with rank_penalty="loss") for the loss."""
        o = self.options
        in_loss = o["lambda_rank"] if o["rank_penalty"] == "loss" else 0.0
        if not (in_loss or o["lambda_orth"]):
            return None
        device_type = next(self.adapter.parameters()).device.type
        with torch.autocast(device_type, enabled=False):  # SVDs in fp32
            total = 0.0
            for _, _, modules in self.modules_by_phase():
                if in_loss:
                    # svdvals (behind the nuclear norm) has stable gradients, also at W_A = 0.
                    total = total + in_loss * sum(
                        torch.linalg.matrix_norm(g.up.weight.float(), ord="nuc")
                        + torch.linalg.matrix_norm(g.down.weight.float(), ord="nuc") for g in modules)
                if o["lambda_orth"] and len(modules) > 1:
                    for i, gi in enumerate(modules):
                        for j, gj in enumerate(modules):
                            if i != j:
                                total = total + o["lambda_orth"] * (gi.up.weight.float().T @ gj.up.weight.float()).pow(2).sum()
        return total if torch.is_tensor(total) else None  # k = 1: no pair to keep orthogonal

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """rank_penalty="proximal": the proximal step of lr * lambda_rank * ||W||_* for W_A and W_B.

        Singular-value soft thresholding, the exact minimiser of the penalty's linearised
        objective (as AdamW decouples weight decay). Put through Adam instead, the
        penalty's gradient U V^T is normalised to steps of size lr whatever lambda is,
        and it drives B to zero within tens of steps while W_A still has no task gradient.
        """
        o = self.options
        if o["rank_penalty"] != "proximal" or not o["lambda_rank"]:
            return
        threshold = lr * o["lambda_rank"]
        for _, _, modules in self.modules_by_phase():
            for g in modules:
                for w in (g.up.weight, g.down.weight):
                    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
                    w.copy_((u * (s - threshold).clamp(min=0)) @ vh)

    def nuclear_norms(self) -> float:
        """sum over modules of ||W_A||_* + ||W_B||_* (the rank penalty before lambda)."""
        with torch.no_grad():
            return float(sum(torch.linalg.matrix_norm(g.up.weight.float(), ord="nuc")
                             + torch.linalg.matrix_norm(g.down.weight.float(), ord="nuc")
                             for _, _, mods in self.modules_by_phase() for g in mods))

    def formula(self) -> dict:
        """Per phase k ((d + d_t) r + r d + d_c r + 2 r) per site, plus the time MLP 2 (d_t^2 + d_t)."""
        o = self.options
        backbone = self.model.backbone
        d, d_c, d_t, k = backbone.hidden_size, backbone.word_embeddings.embedding_dim, o["time_dim"], o["k"]
        sites = len(self.adapter.sites)
        per_phase = {phase: k * ((d + d_t) * r + r * d + d_c * r + 2 * r) for phase, r in zip(PHASES, o["ranks"])}
        time_mlp = 2 * (d_t * d_t + d_t)
        return {"formula": "sites * sum_phases k*((d + d_t)*r + r*d + d_c*r + 2r) + 2*(d_t^2 + d_t)",
                "terms": {"d": d, "d_t": d_t, "d_c": d_c, "k": k, "ranks": o["ranks"], "sites": sites,
                          "per_phase": per_phase, "time_mlp": time_mlp},
                "formula_total": sites * sum(per_phase.values()) + time_mlp}
