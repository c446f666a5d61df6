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
* `phases="shared"` (an ablation: does the phase matter?): one set of k modules of rank
  r_early + r_middle + r_late, scale 1, acts at every step, with the same parameter count;
  `final`/`blocks` still read e(t), `weights` is then blind to the step;
* regularisers: lambda_rank * sum(||up||_* + ||down||_*), lambda_orth * sum_{i != j}
  ||up_i^T up_j||_F^2 inside a phase;
* injection `blocks` (default): one set of phase modules after every block (the last
  one is `final`'s), acting on every position (`blocks_positions="all"`; the context
  positions, prompt and tokens already revealed, standardised with their own statistics)
  or only on those being denoised ("denoised"); backward through the base. `final`: one
  perturbation after the last block; the base runs without a graph, so training has no
  backward pass through it, but the final states are all it can read (the paper's form,
  and the weakest learner here: README, "Does knowing the step help?").
* injection `weights`: the same phase modules as low-rank updates of the base's
  projections (`targets`: q, k, v, o and the two MLP projections by default). A
  projection W [d_out, d_in] of the step's phase p computes (W + dW_p(c)) x with

      dW_p(c) = sigma_p * sum_{i=1..k} up_i diag(1 + gamma_i(c)) down_i

  (a `WeightModule` per i: down d_in -> r_p, Kaiming; up r_p -> d_out, zero). The phase
  is all of t that enters: no e(t) and no ReLU, so dW_p(c) is one matrix per phase and
  instruction, and it folds into W for the steps of one phase (`merged_for`: a sampler
  segment inside one phase, or the forward passes of an evaluation at one t; a step of
  another phase is refused until `unmerge`). No time embedding is
  built for this site, and no calibration: a projection reads LayerNorm'd states (or
  functions of them), so `calibrate` is ignored (and `time_dim` refused).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import PHASES, StepContext, phase_of
from ..distributed import assign
from ..errors import UserError
from .base import BaseSnapshot, Method, MethodConfig, freeze, option
from .weight_lora import TARGETS

RANK_SCHEDULES = {"adaptive": (64, 32, 8), "inverted": (8, 32, 64)}
CALIBRATION_BUFFERS = ("h_mean", "h_std", "calibrated", "context_mean", "context_std")


@dataclass
class LoRADiffusionConfig(MethodConfig):
    method = "lora_diffusion"
    schedule: str = option("adaptive", "ranks per phase: adaptive 64/32/8, inverted 8/32/64, or uniform "
                                       "(every phase at `rank`)", choices=("adaptive", "inverted", "uniform"))
    ranks: tuple[int, int, int] | None = option(None, "ranks of the early, middle and late phase; none = "
                                                      "from the schedule", min=1, max=1024)
    rank: int = option(32, "the rank of every phase with schedule=uniform", min=1, max=1024)
    scales: tuple[float, float, float] = option((1.0, 0.5, 0.25), "scale sigma of the early, middle and late "
                                                                  "phase's perturbation", min=0.0, max=100.0)
    k: int = option(2, "modules per phase", min=1, max=16)
    time_dim: int = option(64, "width d_t of the time embedding (even; weights has none)", min=2, max=1024)
    lambda_rank: float = option(0.01, "weight of the nuclear-norm rank penalty", min=0.0)
    lambda_orth: float = option(0.001, "weight of the orthogonality penalty between a phase's modules", min=0.0)
    # `blocks` on every position is the default: the best site on SST-2 at weight LoRA's
    # budget (README, "Does knowing the step help?").
    injection: str = option("blocks", "where delta acts: after the last block, after every block, or as "
                                     "low-rank updates of the base's projections (weights: the step's phase "
                                     "picks the update, no continuous time modulation, so it merges per phase)",
                            choices=("final", "blocks", "weights"))
    targets: str = option("attention+mlp", "the projections injection=weights adapts", choices=tuple(TARGETS))
    blocks_positions: str = option("all", "the positions injection=blocks perturbs: all (the context "
                                          "standardised with its own statistics) or only those being denoised",
                                   choices=("denoised", "all"))
    phases: str = option("separate", "one set of k modules per phase (the method), or one shared set for every "
                                     "step with rank = the sum of the phase ranks and scale 1: equal parameters, "
                                     "no phase (an ablation)", choices=("separate", "shared"))
    condition: bool = option(True, "gate the rank directions by the instruction")
    calibrate: bool = option(True, "standardise h with statistics of the first batch (saved); final and "
                                   "blocks only, weights reads LayerNorm'd inputs")
    rank_penalty: str = option("proximal", "apply the rank penalty as a proximal step after each "
                                           "optimiser step, or as a loss term", choices=("proximal", "loss"))

    def check(self) -> None:
        if self.time_dim % 2:
            raise UserError(f"method 'lora_diffusion' option 'time_dim' must be even, not {self.time_dim}")
        # An option of another injection site would be silently ignored: most likely the
        # injection itself was forgotten.
        for name, why in self.ignored(self.to_dict()).items():
            if self.changed(name):
                raise UserError(f"method 'lora_diffusion' option {name!r} {why}")

    @classmethod
    def ignored(cls, options: dict) -> dict[str, str]:
        """{option: why} for the options that `options`' injection site and phases ignore."""
        injection = options.get("injection", cls.__dataclass_fields__["injection"].default)
        phases = options.get("phases", cls.__dataclass_fields__["phases"].default)
        why = {}
        if injection == "weights":
            why["time_dim"] = "applies to injection=final or blocks; injection=weights has no time embedding"
        else:
            why["targets"] = f"applies to injection=weights, not injection={injection}"
        if injection != "blocks":
            why["blocks_positions"] = f"applies to injection=blocks, not injection={injection}"
        if phases == "shared":
            why["scales"] = "applies to phases=separate; one shared module set has scale 1"
        return why

    @classmethod
    def from_stored(cls, options: dict | None) -> "LoRADiffusionConfig":
        # Written before the default became blocks on every position: the defaults of that time.
        options = {"injection": "final", **(options or {})}
        if options["injection"] == "blocks":
            options.setdefault("blocks_positions", "denoised")
        return super().from_stored(options)

    def phase_ranks(self) -> tuple[int, int, int]:
        """The ranks of the early, middle and late phase: `ranks`, else the schedule's."""
        if self.ranks is not None:
            return self.ranks
        return (self.rank,) * 3 if self.schedule == "uniform" else RANK_SCHEDULES[self.schedule]

    def module_ranks(self) -> tuple[int, ...]:
        """The rank of each set of modules: one per phase, or one shared set of their summed rank."""
        ranks = self.phase_ranks()
        return ranks if self.phases == "separate" else (sum(ranks),)

    def module_scales(self) -> tuple[float, ...]:
        return self.scales if self.phases == "separate" else (1.0,)

    def module_sets(self) -> tuple[str, ...]:
        """The names of the module sets: the phases, or one set for all of them."""
        return PHASES if self.phases == "separate" else ("all",)

    def default_lr(self) -> float:
        # Adam moves every site by ~lr per step, and a perturbation inside the body is
        # amplified by the blocks after it: 3e-3 diverged and 1e-3 stayed at chance on
        # 64 SST-2 examples it should memorise; 3e-4 fits them. `weights` wants a small rate
        # at any size: on SST-2 (600 steps x 16, validation split; results/
        # stepaware_sst2_sweep.json) k = 1, ranks 6/3/1 on attention reached 80.3% at 6e-4,
        # 56.2% at 2e-3 and lost the label at 6e-3; with the 64/32/8, k = 2 default on every
        # projection 5e-4 was best in a 400-step script and 1e-3 diverged.
        if self.injection == "weights":
            return 6e-4
        return {"final": 3e-3, "blocks": 3e-4}[self.injection]


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
        return self.mlp(self.features(t, self.dim).to(self.mlp[0].weight.dtype))

    @staticmethod
    def features(t: torch.Tensor, dim: int) -> torch.Tensor:
        """The sinusoidal features [B, dim] of times t [B] (what the MLP reads)."""
        half = dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], -1)


class GatedLowRank(nn.Module):
    """The part every module shares: `down` to r directions, gated by the instruction, `up` out.

    up(z * (1 + gamma(c))) = up diag(1 + gamma(c)) z with gamma(c) = gate(Enc(c)). The gate
    only rescales the r directions, so the map never has rank above r. `up` and the gate
    start at zero: the map starts at zero and the adapted model equal to the base.
    """

    def __init__(self, d_in: int, d_out: int, d_c: int, r: int, down_bias: bool = True):
        super().__init__()
        self.down = nn.Linear(d_in, r, bias=down_bias)  # B_i: Kaiming-uniform (nn.Linear's default)
        self.up = nn.Linear(r, d_out, bias=False)       # W_A,i
        self.gate = nn.Linear(d_c, r)                   # W_gamma,i
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.gate.weight)                # gamma = 0 at init: A(c) = W_A
        nn.init.zeros_(self.gate.bias)

    def gated_up(self, z, c):
        """up diag(1 + gamma(c)) z for z [B, L, r] and Enc(c) [B, d_c] (None: no gating)."""
        if c is not None:
            z = z * (1 + self.gate(c))[:, None, :]
        return self.up(z)


class TrajectoryModule(GatedLowRank):
    """One g_i of `final` and `blocks`: A_i(c) ReLU(B_i [h ; e(t)])."""

    def __init__(self, d: int, d_t: int, d_c: int, r: int):
        super().__init__(d + d_t, d, d_c, r)
        self.d = d

    def forward(self, h, e, c):
        # B [h ; e] = B_h h + B_e e: the time part is one vector per example.
        w = self.down.weight
        z = F.linear(h, w[:, :self.d]) + F.linear(e, w[:, self.d:], self.down.bias)[:, None, :]
        return self.gated_up(F.relu(z), c)


class WeightModule(GatedLowRank):
    """One term up_i diag(1 + gamma_i(c)) down_i of a projection's update: linear in x, so a matrix."""

    def __init__(self, d_in: int, d_out: int, d_c: int, r: int):
        super().__init__(d_in, d_out, d_c, r, down_bias=False)  # a bias would not be a weight update

    def forward(self, x, c):
        return self.gated_up(self.down(x), c)

    def delta_weight(self, c) -> torch.Tensor:
        """The term as a matrix [d_out, d_in], for one Enc(c) [d_c] (None: no gating)."""
        up = self.up.weight if c is None else self.up.weight * (1 + self.gate(c))
        return up @ self.down.weight


def by_phase(phase: torch.Tensor, part, every_set: int = 0):
    """A batch whose rows may be in different phases (training draws t per example).

    `part(p, rows)` computes the rows in phase p (rows None: the whole batch is in p, as
    always when sampling); the parts are stitched back into batch order. With `every_set`,
    each of the first `every_set` sets is computed, on no rows where none is in it
    (`Method.every_parameter_each_step`).
    """
    out = None
    for p in range(every_set or len(PHASES)):
        rows = (phase == p).nonzero().flatten()
        if len(rows) == 0 and not every_set:
            continue
        if len(rows) == len(phase) and not every_set:
            return part(p, None)
        values = part(p, rows)
        if out is None:
            out = torch.zeros((len(phase),) + values.shape[1:], dtype=values.dtype, device=values.device)
        out = out.index_copy(0, rows, values)
    return out


def _take(x, rows):
    """The rows of x (all of them for rows None; None stays None)."""
    return x if x is None or rows is None else x[rows]


class PhaseModules(nn.Module):
    """The k modules of each phase (or of the one shared set) at one injection site of `final` or `blocks`.

    `h_mean` / `h_std` standardise h per dimension before the modules see it. The base's
    hidden states at the positions it predicts vary across inputs by a few hundredths
    around means ten times larger, so B [h ; e(t)] starts out nearly constant; the
    statistics are taken once, from the first batch the site sees (`calibrate`), and
    saved with the adapter. Standardising only rescales B's input: the family of
    functions is the one defined at the top of this module. A site that also acts on the
    context positions (`context_stats`, blocks_positions="all") keeps their statistics
    apart (`context_mean` / `context_std`): the prompt's states differ from the denoised
    ones in scale, and modules calibrated on the denoised ones alone blew them up.
    """

    def __init__(self, d, d_t, d_c, ranks, k, context_stats: bool = False):
        super().__init__()
        self.phases = nn.ModuleList(
            nn.ModuleList(TrajectoryModule(d, d_t, d_c, r) for _ in range(k)) for r in ranks)
        self.register_buffer("h_mean", torch.zeros(d))
        self.register_buffer("h_std", torch.ones(d))
        self.register_buffer("calibrated", torch.tensor(False))
        self.context_stats = context_stats
        if context_stats:
            self.register_buffer("context_mean", torch.zeros(d))
            self.register_buffer("context_std", torch.ones(d))

    @torch.no_grad()
    def calibrate(self, h: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """Statistics of h at the read positions [..., d], and of the context's [..., d] with context_stats."""
        _set_statistics(self.h_mean, self.h_std, h)
        if self.context_stats and context is not None:
            _set_statistics(self.context_mean, self.context_std, context)
        self.calibrated.fill_(True)

    def standardise(self, h, positions=None):
        context = (self.context_mean, self.context_std) if self.context_stats else None
        return standardised(h, self.h_mean, self.h_std, positions, context)

    def forward(self, h, e, c, phase, scales, positions=None, every_set: bool = False):
        h = self.standardise(h, positions)
        return by_phase(phase, lambda p, rows: scales[p] * sum(
            g(_take(h, rows), _take(e, rows), _take(c, rows)) for g in self.phases[p]),
            every_set=len(self.phases) if every_set else 0)


class StackedAdapters:
    """Several LoRA-Diffusion adapters of one shape (`final` or `blocks`) on one batch, each row
    through its own adapter: the batched form of a mixed batch (`router.Composition.assign`).

    Looping over the adapters (each gathering its rows, running its modules, scattering the
    result back) costs a few dozen small operations per adapter at every site: at `blocks` (6
    sites) 8 adapters kept 0.80x of one adapter's throughput. Here each weight is stacked over
    the adapters, [M + 1, ...] with an all-zero last slot for rows that are not theirs; each row
    gathers its adapter's slice and one batched matmul serves the whole batch. The k modules of
    a phase are concatenated along their rank: ReLU and the gate act per direction, so
    sum_i up_i (ReLU(down_i x) * g_i) = [up_1 .. up_k] (ReLU([down_1; ..; down_k] x) * [g_1; ..; g_k]).

    The stacks are copies taken once, for decoding: adapters still being trained, or not yet
    calibrated (their first batch sets their statistics), must go through the loop.
    """

    def __init__(self, methods: list["LoRADiffusion"]):
        if not self.can_stack(methods):
            raise UserError("stacking needs calibrated LoRA-Diffusion adapters of one shape (final or blocks)")
        self.config, self.backbone = methods[0].config, methods[0].model.backbone
        self.module_set = methods[0].module_set  # which set acts at t: the same for every adapter of a shape
        trajectories = [m.trajectory for m in methods]
        d = self.backbone.hidden_size
        with torch.no_grad():
            mlps = [tr.time.mlp for tr in trajectories]
            # the time MLP as x W^T + b: each weight stacked transposed, ready for bmm
            self.time = [(_stacked([mlp[i].weight.T for mlp in mlps]), _stacked([mlp[i].bias for mlp in mlps]))
                         for i in (0, 2)]
            self.sites = []
            for s in range(len(trajectories[0].sites)):
                sites = [tr.sites[s] for tr in trajectories]
                statistics = {name: _stacked([getattr(site, name) for site in sites], fill=fill)
                              for name, fill in (("h_mean", 0.0), ("h_std", 1.0), ("context_mean", 0.0),
                                                 ("context_std", 1.0)) if hasattr(sites[0], name)}
                phases = []
                for p in range(len(sites[0].phases)):
                    modules = [list(site.phases[p]) for site in sites]
                    down = [torch.cat([g.down.weight for g in gs]) for gs in modules]  # [k r, d + d_t]
                    phases.append({
                        "down_h": _stacked([w[:, :d].T for w in down]), "down_e": _stacked([w[:, d:].T for w in down]),
                        "down_b": _stacked([torch.cat([g.down.bias for g in gs]) for gs in modules]),
                        "gate": _stacked([torch.cat([g.gate.weight for g in gs]).T for gs in modules]),
                        "gate_b": _stacked([torch.cat([g.gate.bias for g in gs]) for gs in modules]),
                        "up": _stacked([torch.cat([g.up.weight for g in gs], 1).T for gs in modules])})
                self.sites.append((statistics, phases))
        self.scales = trajectories[0].scales
        self.device = self.scales.device

    @staticmethod
    def shape(method: "LoRADiffusion") -> tuple:
        """What must agree for adapters to share one stack (the rest is in their weights)."""
        c = method.config
        return (c.injection, c.module_ranks(), c.module_scales(), c.k, c.time_dim, c.condition, c.phases,
                c.blocks_positions if c.injection == "blocks" else None)

    @classmethod
    def can_stack(cls, methods) -> bool:
        return (bool(methods) and len({cls.shape(m) for m in methods}) == 1
                and methods[0].config.injection in ("final", "blocks")
                and all(not m.config.calibrate or all(bool(site.calibrated) for site in m.trajectory.sites)
                        for m in methods))

    @torch.no_grad()
    def delta(self, site: int, h, context: StepContext, slot: torch.Tensor):
        """delta_t at `site` for hidden states h [B, L, d], row b through adapter slot[b] (the
        adapters' order; their number for none): what each adapter's own perturbation gives its rows."""
        statistics, phases = self.sites[site]
        t, instruction, positions, _ = context
        t = t.to(h.device).float()
        dtype = self.time[0][0].dtype  # the adapters' (h is cast to it, as nn.Linear would need)
        e = TimeEmbedding.features(t, self.config.time_dim).to(dtype)[:, None]  # [B, 1, d_t]
        for i, (w, b) in enumerate(self.time):
            e = torch.baddbmm(b[slot][:, None], e, w[slot])
            e = F.silu(e) if i == 0 else e
        c = None
        if self.config.condition and instruction is not None:
            c = encode_instruction(self.backbone, instruction).to(dtype)[:, None]  # [B, 1, d_c]
        own = {name: value[slot][:, None] for name, value in statistics.items()}  # [B, 1, d] each
        context = (own["context_mean"], own["context_std"]) if "context_mean" in own else None
        x = standardised(h, own["h_mean"], own["h_std"], positions, context).to(dtype)
        phase = self.module_set(t)

        def part(p, rows):
            m, own = phases[p], _take(slot, rows)
            if rows is None:
                rows = slice(None)
            by_time = torch.baddbmm(m["down_b"][own][:, None], e[rows], m["down_e"][own])  # B_e e(t) + b
            z = F.relu(torch.bmm(x[rows], m["down_h"][own]) + by_time)
            if c is not None:
                z = z * (1 + torch.baddbmm(m["gate_b"][own][:, None], c[rows], m["gate"][own]))
            return self.scales[p] * torch.bmm(z, m["up"][own])

        delta = by_phase(phase, part)
        if self.config.injection == "blocks" and self.config.blocks_positions == "denoised" and positions is not None:
            delta = delta * positions.unsqueeze(-1).to(delta.dtype)
        return delta


def _stacked(tensors, fill: float = 0.0) -> torch.Tensor:
    """[M + 1, ...]: the tensors one after another and a last slot of `fill` (rows of no adapter)."""
    tensors = [x.detach() for x in tensors]
    return torch.stack(tensors + [torch.full_like(tensors[0], fill)])


def standardised(h, mean, std, positions=None, context=None):
    """(h - mean) / std; with `context` (its mean and std) and `positions` [B, L], the positions not
    read are standardised with the context's statistics. Statistics [d] (one adapter's) or
    [B, 1, d] (each row its own adapter's, as `StackedAdapters` gathers them)."""
    if context is not None and positions is not None:
        read = positions.unsqueeze(-1)
        mean, std = torch.where(read, mean, context[0]), torch.where(read, std, context[1])
    return (h - mean.to(h.dtype)) / std.to(h.dtype)


def _set_statistics(mean: torch.Tensor, std: torch.Tensor, h: torch.Tensor) -> None:
    rows = h.reshape(-1, h.shape[-1]).float()
    mean.copy_(rows.mean(0))
    std.copy_(rows.std(0).clamp(min=1e-3) if len(rows) > 1 else torch.ones_like(std))


class ProjectionModules(nn.Module):
    """The k modules of each phase for one projection W [d_out, d_in] (injection `weights`)."""

    def __init__(self, d_in, d_out, d_c, ranks, k):
        super().__init__()
        self.phases = nn.ModuleList(
            nn.ModuleList(WeightModule(d_in, d_out, d_c, r) for _ in range(k)) for r in ranks)

    def forward(self, x, c, phase, scales, every_set: bool = False):
        """dW_p(c) x for the projection's inputs x [B, L, d_in], each row with its own phase p."""
        return by_phase(phase, lambda p, rows: scales[p] * sum(
            g(_take(x, rows), _take(c, rows)) for g in self.phases[p]),
            every_set=len(self.phases) if every_set else 0)

    def delta_weight(self, p: int, c, scale) -> torch.Tensor:
        """dW_p(c) [d_out, d_in] for one Enc(c) [d_c] (None: no gating)."""
        return scale * sum(g.delta_weight(c) for g in self.phases[p])


def _one_instruction(instruction: torch.Tensor) -> torch.Tensor:
    """Token ids [Li] or [B, Li] of one instruction as [1, Li]; rows that differ are refused."""
    ids = instruction.reshape(-1, instruction.shape[-1])
    if not bool((ids == ids[:1]).all()):
        raise UserError("merging needs one instruction for the whole batch; these rows differ")
    return ids[:1]


class LoRADiffusion(Method):
    name = "lora_diffusion"
    Config = LoRADiffusionConfig
    # merge() without a phase cannot be honoured: `weights` merges one phase at a time
    # (`merged_for`), and final/blocks perturb h nonlinearly.
    can_merge = False

    @property
    def reads_final_states_only(self) -> bool:
        return self.config.injection == "final"

    def attach(self, model) -> None:
        self.add_modules(model)
        injection = self.config.injection
        if injection == "final":
            self.hooks.append(model.add_step_hook(self._final_hook))
            return
        model.grad_through_body = True
        if injection == "blocks":
            for i, block in enumerate(model.backbone.blocks()):
                self.hooks.append(block.register_forward_hook(self._block_hook(i)))
        else:
            self.hooks.append(model.backbone.body.register_forward_pre_hook(self._start_step))
            for site, (_, layer) in enumerate(self.projections):
                self.hooks.append(layer.register_forward_hook(self._projection_hook(site)))

    def add_modules(self, model, module_name: str = "trajectory") -> None:
        """Build the modules under `model.<module_name>`, without hooking them in (a router mixes them)."""
        self.model, self.module_name = model, module_name
        self._step = self._merged_step = self._premerge = None
        backbone = model.backbone
        c = self.config
        d, d_c = backbone.hidden_size, backbone.word_embeddings.embedding_dim
        ranks = c.module_ranks()
        if c.injection == "weights":
            self.projections = list(backbone.projections(*TARGETS[c.targets]).items())
        _check_size(self.formula()["formula_total"])  # before anything on the model changes
        self._remember_requires_grad(backbone.mlm)
        freeze(backbone.mlm)
        trajectory = nn.Module()
        if c.injection == "weights":
            sites = [ProjectionModules(layer.in_features, layer.out_features, d_c, ranks, c.k)
                     for _, layer in self.projections]
        else:
            trajectory.time = TimeEmbedding(c.time_dim)
            n_sites = 1 if c.injection == "final" else len(backbone.blocks())
            context_stats = c.injection == "blocks" and c.blocks_positions == "all"
            sites = [PhaseModules(d, c.time_dim, d_c, ranks, c.k, context_stats) for _ in range(n_sites)]
        trajectory.sites = nn.ModuleList(sites)
        trajectory.register_buffer("scales", torch.tensor(c.module_scales()), persistent=False)
        self.trajectory = trajectory.to(next(backbone.parameters()).device)
        model.add_module(module_name, self.trajectory)

    def detach(self) -> None:
        self.unmerge()
        delattr(self.model, self.module_name)
        self.model.grad_through_body = False
        super().detach()

    def _every_set(self) -> bool:
        """Run every set of modules, even on no rows (under DeepSpeed, for a backward only)."""
        return self.every_parameter_each_step and torch.is_grad_enabled()

    def module_set(self, t: torch.Tensor) -> torch.Tensor:
        """Which set of modules acts at times t [B]: the phase of each, or the one shared set."""
        phase = phase_of(t)
        return phase if self.config.phases == "separate" else torch.zeros_like(phase)

    def instruction_encoding(self, instruction):
        """Enc(c) when the method is conditioned on the instruction, else None."""
        if instruction is None or not self.config.condition:
            return None
        return encode_instruction(self.model.backbone, instruction)

    # -- final and blocks: a perturbation of the hidden states --------------------------

    def perturbation(self, site: int, h, t, instruction, positions=None, attention_mask=None):
        """delta_t at one injection site, for hidden states h [B, L, d] at times t [B].

        `positions` [B, L] marks where logits are read; the first call calibrates the
        site's standardisation on h there (and, with context statistics, on the other real
        tokens: padding, where `attention_mask` is 0, is left out).
        """
        modules = self.trajectory.sites[site]
        if self.config.calibrate and not bool(modules.calibrated):
            read = positions is not None and bool(positions.any())
            context = None
            if modules.context_stats and read:
                others = ~positions if attention_mask is None else ~positions & attention_mask.bool()
                context = h[others] if bool(others.any()) else None
            modules.calibrate(h[positions] if read else h, context)
        t = t.to(h.device).float()
        e = self.trajectory.time(t)
        c = self.instruction_encoding(instruction)
        return modules(h, e, c, self.module_set(t), self.trajectory.scales, positions, every_set=self._every_set())

    def final_delta(self, h, context: StepContext):
        """delta_t on the last hidden states (injection `final`)."""
        return self.perturbation(0, h, context.t, context.instruction, context.positions, context.attention_mask)

    def _final_hook(self, h, context: StepContext):
        return self.final_delta(h, context)

    def block_delta(self, site: int, h, context: StepContext):
        """delta_t after block `site` (injection `blocks`), zero where this site leaves h alone."""
        if context is None:
            raise UserError("LoRA-Diffusion (injection=blocks) acts at a denoising step: run the model "
                            "through DiffusionLM (which gives it t), not the backbone alone")
        t, instruction, positions, attention_mask = context
        delta = self.perturbation(site, h, t, instruction, positions, attention_mask).to(h.dtype)
        # blocks_positions="denoised" moves only the positions being denoised, as `final`
        # does: the prompt's tokens differ from them in scale, and perturbing them with
        # modules calibrated on the response blew them up (measured: SST-2 at chance).
        # "all" moves them too, standardised on their own statistics.
        if positions is not None and self.config.blocks_positions == "denoised":
            delta = delta * positions.unsqueeze(-1).to(h.dtype)
        return delta

    def _block_hook(self, site: int):
        return block_output_hook(lambda h: self.block_delta(site, h, self.model.step_context))

    # -- weights: low-rank updates of the projections ----------------------------------

    def _start_step(self, module, args):
        """Before each pass of the body: the step's phase per row and Enc(c), for every projection."""
        if self.model.step_context is None:
            raise UserError("LoRA-Diffusion (injection=weights) acts at a denoising step: run the model "
                            "through DiffusionLM (which gives it t), not the backbone alone")
        t, instruction = self.model.step_context.t, self.model.step_context.instruction
        device = self.trajectory.scales.device
        phase, c = self.module_set(t.to(device).float()), self.instruction_encoding(instruction)
        if self.merged:
            self._check_merged_step(phase, c)
        self._step = (phase, c)

    def _projection_hook(self, site: int):
        def hook(module, args, output):
            if self.merged:  # dW_p(c) is in the weight already
                return None
            phase, c = self._step
            delta = self.trajectory.sites[site](args[0], c, phase, self.trajectory.scales, every_set=self._every_set())
            return output + delta.to(output.dtype)
        return hook

    @torch.no_grad()
    def merge(self, phase=None, instruction=None) -> None:
        """injection=weights: fold dW_phase(c) into the projections, for steps that are all in
        `phase` (a name or index) and share `instruction` (token ids [Li], or [B, Li] with equal
        rows, as when sampling one task's batch); a step that is not is refused until `unmerge`."""
        if self.config.injection != "weights":
            super().merge()  # refuses: a perturbation of h is no weight update
        if phase is None:
            raise UserError("LoRA-Diffusion (injection=weights) has one update per phase: "
                            "merge(phase, instruction), or `with method.merged_for(phase, instruction)`")
        p = PHASES.index(phase) if phase in PHASES else phase
        if p not in range(len(PHASES)):
            raise UserError(f"a phase is one of {', '.join(PHASES)} (or 0, 1, 2), not {phase!r}")
        if self.config.phases == "shared":
            p = 0  # one set for every phase
        self.unmerge()
        device = self.trajectory.scales.device
        given = instruction is not None and self.config.condition  # unconditioned: the instruction is unused
        c = self.instruction_encoding(_one_instruction(instruction.to(device)) if given else None)
        self._premerge = BaseSnapshot({name: layer.weight for name, layer in self.projections})
        scale = self.trajectory.scales[p]
        for (_, layer), site in zip(self.projections, self.trajectory.sites):
            dw = site.delta_weight(p, None if c is None else c[0], scale)
            layer.weight.add_(dw.to(layer.weight.dtype))
        self.merged, self._merged_step = True, (p, c)

    def unmerge(self) -> None:
        """Put back the exact weights from before `merge` (W + dW - dW is not W in floating point)."""
        if self.merged:
            self._premerge.restore()
            self.merged, self._merged_step, self._premerge = False, None, None

    @contextlib.contextmanager
    def merged_for(self, phase, instruction=None):
        """`with method.merged_for("late", ids): ...` runs with dW_late(c) in the weights, then unmerges."""
        self.merge(phase, instruction)
        try:
            yield self.model
        finally:
            self.unmerge()

    def _check_merged_step(self, phase, c) -> None:
        p, merged_c = self._merged_step
        if not bool((phase == p).all()):
            raise UserError(f"the weights are merged for the {self.config.module_sets()[p]} phase, and this step is not "
                            "(all of it) in it: unmerge first")
        same = (c is None) == (merged_c is None) and (c is None or torch.allclose(c, merged_c.expand_as(c)))
        if not same:
            raise UserError("the weights are merged for another instruction than this step's: unmerge first")

    # -- what is trained and saved ------------------------------------------------------

    # Tensor names in the adapter file are "trajectory.<...>", whatever the module is called
    # on the model (a router holds several, as task_0, task_1, ...).
    def trainable_parameters(self):
        return {f"trajectory.{n}": p for n, p in self.trajectory.named_parameters()}

    def buffers(self):
        if not self.config.calibrate:
            return {}
        return {f"trajectory.{n}": b for n, b in self.trajectory.named_buffers()
                if n.split(".")[-1] in CALIBRATION_BUFFERS}

    def modules_by_phase(self):
        """[(site, phase, [module, ...])] for every site (a block, the final states or a projection) and phase."""
        names = self.config.module_sets()
        return [(s, names[p], list(mods)) for s, site in enumerate(self.trajectory.sites)
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
        by_shape = {}  # one batched SVD per shape: `weights` has hundreds of small matrices
        for _, _, modules in self.modules_by_phase():
            for g in modules:
                for w in (g.up.weight, g.down.weight):
                    by_shape.setdefault(w.shape, []).append(w)
        for weights in by_shape.values():
            for w, new in zip(weights, _shrink_singular_values(torch.stack(weights), threshold)):
                assign(w, new)  # under DeepSpeed, into its master copy too

    def nuclear_norms(self) -> float:
        """sum over modules of ||up||_* + ||down||_* (the rank penalty before lambda)."""
        with torch.no_grad():
            return float(sum(_nuclear_norm(mods) for _, _, mods in self.modules_by_phase()))

    def formula(self) -> dict:
        """Per phase k ((d + d_t) r + r d + d_c r + 2 r) per site, plus the time MLP 2 (d_t^2 + d_t)."""
        c = self.config
        if c.injection == "weights":
            return self._weights_formula()
        backbone = self.model.backbone
        d, d_c, d_t, k = backbone.hidden_size, backbone.word_embeddings.embedding_dim, c.time_dim, c.k
        sites = 1 if c.injection == "final" else len(backbone.blocks())
        per_phase = {phase: k * ((d + d_t) * r + r * d + d_c * r + 2 * r) for phase, r in zip(c.module_sets(), c.module_ranks())}
        time_mlp = 2 * (d_t * d_t + d_t)
        return {"formula": "sites * sum_phases k*((d + d_t)*r + r*d + d_c*r + 2r) + 2*(d_t^2 + d_t)",
                "terms": {"d": d, "d_t": d_t, "d_c": d_c, "k": k, "ranks": list(c.module_ranks()), "sites": sites,
                          "per_phase": per_phase, "time_mlp": time_mlp},
                "formula_total": sites * sum(per_phase.values()) + time_mlp}

    def _weights_formula(self) -> dict:
        """Per projection per phase k (d_in r + r d_out + d_c r + r): down, up, the gate and its bias; no time."""
        c = self.config
        d_c, k = self.model.backbone.word_embeddings.embedding_dim, c.k
        shapes = Counter((layer.in_features, layer.out_features) for _, layer in self.projections)
        per_phase = {phase: sum(n * k * (d_in * r + r * d_out + d_c * r + r) for (d_in, d_out), n in shapes.items())
                     for phase, r in zip(c.module_sets(), c.module_ranks())}
        return {"formula": "sum_projections sum_phases k*(d_in*r + r*d_out + d_c*r + r)",
                "terms": {"d_c": d_c, "k": k, "ranks": list(c.module_ranks()), "sites": len(self.projections),
                          "projections": {f"{d_in}x{d_out}": n for (d_in, d_out), n in shapes.items()},
                          "per_phase": per_phase},
                "formula_total": sum(per_phase.values())}


# 256M float32 parameters (1 GiB, four times that with Adam's state): far above any useful
# adapter of a base this project can train, and a wrong option should fail here, not in
# the allocator.
MAX_TRAINABLE = 2**28


def block_output_hook(delta_of):
    """A forward hook adding delta_of(h) to a block's hidden states (its output or the first of a tuple)."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + delta_of(h)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return hook


def _check_size(total: int) -> None:
    if total > MAX_TRAINABLE:
        raise UserError(f"method 'lora_diffusion' with these options trains {total:,} parameters, over the cap of "
                        f"{MAX_TRAINABLE:,}: lower ranks, k or (with injection=weights) targets")


def _shrink_singular_values(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """U diag(max(s - threshold, 0)) V^T for a stack of matrices [N, m, n] with SVDs U diag(s) V^T.

    Through the eigendecomposition, in float64, of the Gram matrix of the smaller side
    (r x r for a module of rank r narrower than the model): the same result as an SVD
    (to ~1e-6 relative) at a fraction of the cost.
    """
    wide = w.shape[-2] <= w.shape[-1]
    x = (w if wide else w.transpose(-2, -1)).double()  # [N, small, large]
    eigenvalues, u = torch.linalg.eigh(x @ x.transpose(-2, -1))
    s = eigenvalues.clamp(min=0).sqrt()
    factor = torch.where(s > threshold, (s - threshold) / s.clamp(min=1e-300), torch.zeros_like(s))
    shrink = ((u * factor.unsqueeze(-2)) @ u.transpose(-2, -1)).to(w.dtype)  # small x small, entries in [-1, 1]
    return shrink @ w if wide else w @ shrink


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
