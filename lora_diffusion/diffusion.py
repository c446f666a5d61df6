"""Masked (absorbing-state) diffusion: the forward process, the loss and the sampler.

Read top to bottom, in the spirit of MDLM's `diffusion.py`:

* forward process: each response token becomes [MASK] with probability t (the
  log-linear schedule: alpha_t = 1 - t), the prompt is never noised;
* loss: cross-entropy on masked response tokens, weighted by 1/t and normalised by
  the response length (LLaDA's SFT objective; an upper bound on the NLL). By default
  it is estimated with the exact-count form of the same bound (below), whose weights
  stay in [1, L] instead of reaching 1/eps;
* sampler: T steps from an all-[MASK] response, revealing a few positions per step
  (low-confidence or random remasking, optional semi-autoregressive blocks); prompt
  tokens never change and a revealed token is never changed again.

`DiffusionLM` is the denoiser: the backbone's body, then the step hooks, each adding a
perturbation `hook(h, context) -> delta` to the final hidden states, then the LM head. A
step-aware PEFT method plugs in there; the loss and the sampler pass it the same `t`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .backbone import Backbone
from .bounds import MAX_TEMPERATURE
from .errors import UserError

EPS = 1e-3  # smallest mask rate, so the 1/t weight stays finite


class StepContext(NamedTuple):
    """What one denoising step is about, for methods that act at or inside the body."""

    t: torch.Tensor                    # [B] the step's time (the masked fraction)
    instruction: torch.Tensor | None   # [B, Li] instruction token ids (the conditioning c)
    positions: torch.Tensor | None     # [B, L] bool: where logits are read (None: everywhere)
    attention_mask: torch.Tensor | None = None  # [B, L]: 1 for real tokens, 0 for padding


StepHook = Callable[[torch.Tensor, StepContext], torch.Tensor]


class DiffusionLM(nn.Module):
    """Denoiser x_t -> logits of x_0, with step hooks where trajectory methods act."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        # Parameters of the base alone, counted before any method adds its own.
        self.base_parameters = sum(p.numel() for p in backbone.mlm.parameters())
        self.step_hooks: OrderedDict[int, StepHook] = OrderedDict()
        # Methods whose trainable tensors act inside the body but live outside it (prefixes,
        # per-block trajectory modules) set this so the body builds a graph.
        self.grad_through_body = False
        # The step being computed, for methods acting inside the body (forward hooks); set
        # only while the body runs.
        self.step_context: StepContext | None = None
        # Held by `sample` for its whole run: the step context above is the model's, so two threads
        # decoding with one model (the app serves one kept router to every request) take turns.
        # (A lock cannot be pickled: the model is saved as tensors, never pickled or deep-copied.)
        self.sampling = threading.RLock()
        # Denoiser calls the sampler made (what generation costs). Counted by `sample`, not in
        # `denoise`: a compiled training step must not see a Python counter change.
        self.sampler_calls = 0
        # A `base_cache.BaseStateCache` that serves the frozen body's last states while training a
        # method that reads only those (`train --cache-base`); None: the body runs at every step.
        self.base_cache = None

    def add_step_hook(self, hook: StepHook) -> RemovableHandle:
        """Add `hook(h [B,L,d], context) -> delta [B,L,d]` to every step; `.remove()` the handle to undo."""
        handle = RemovableHandle(self.step_hooks)
        self.step_hooks[handle.id] = hook
        return handle

    def _body_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (
            self.grad_through_body or any(p.requires_grad for p in self.backbone.body.parameters()))

    def denoise(self, input_ids, attention_mask, t, instruction=None, positions=None):
        """Run one denoising step; returns (logits at `positions`, h, perturbation or None).

        `positions` is a bool mask [B, L]; logits come back flattened to [N, V] for the
        True entries (the LM head is the costly part, so it only runs where needed).
        A training step served by `base_cache` has h only there (zero elsewhere).
        """
        # A frozen body needs no graph: a method acting after it trains without a
        # backward pass through the base (the `final` injection point).
        body_needs_grad = self._body_needs_grad()
        grad_ctx = contextlib.nullcontext() if body_needs_grad else torch.no_grad()
        context = self.step_context = StepContext(t, instruction, positions, attention_mask)
        try:
            if self.base_cache is not None and self.training and positions is not None and not body_needs_grad:
                h = self.base_cache(self.backbone, input_ids, attention_mask, positions)
            else:
                with grad_ctx:
                    h = self.backbone.hidden_states(input_ids, attention_mask)
        finally:
            self.step_context = None  # a later call of the body alone must not see this step's t
        delta = None
        for hook in self.step_hooks.values():
            d = hook(h, context)
            delta = d if delta is None else delta + d
        if delta is not None:
            h = h + delta
        selected = h if positions is None else h[positions]
        return self.backbone.logits(selected), h, delta

    def forward(self, input_ids, attention_mask, t, instruction=None, positions=None):
        return self.denoise(input_ids, attention_mask, t, instruction, positions)[0]


# ---------------------------------------------------------------------------------------
# Phases of the trajectory: early t > 2/3, middle 1/3 < t <= 2/3, late t <= 1/3
# ---------------------------------------------------------------------------------------

PHASES = ("early", "middle", "late")
PHASE_BOUNDARIES = (1 / 3, 2 / 3)


def phase_of(t: torch.Tensor) -> torch.Tensor:
    """Phase index per example: 0 early (t > 2/3), 1 middle (1/3 < t <= 2/3), 2 late (t <= 1/3)."""
    return (t <= PHASE_BOUNDARIES[1]).long() + (t <= PHASE_BOUNDARIES[0]).long()


def phase_name(t: float) -> str:
    return PHASES[int(phase_of(torch.tensor([t]))[0])]


# ---------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------

def mask_rate(t: torch.Tensor) -> torch.Tensor:
    """Log-linear schedule: probability that a token is masked at time t in [0, 1]."""
    return (1 - EPS) * t + EPS


def sample_times(batch_size: int, generator=None, device="cpu") -> torch.Tensor:
    """Stratified t ~ U(0,1): one offset, evenly spaced (MDLM's low-discrepancy sampler)."""
    offset = torch.rand(1, generator=generator).item()
    return ((offset + torch.arange(batch_size) / batch_size) % 1.0).to(device)


def still_masked(x, response_mask, mask_id):
    """The response positions of a sampler state x still masked: where a step reads logits
    (a `blocks` LoRA-Diffusion perturbs only there, so a replayed step must use the same)."""
    return (x == mask_id) & response_mask


def add_noise(input_ids, response_mask, rate, mask_id, generator=None):
    """q(x_t | x_0): replace each response token by [MASK] with probability `rate` [B]."""
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    noised = (draws < rate[:, None]) & response_mask
    return input_ids.masked_fill(noised, mask_id), noised


def mask_exactly(input_ids, response_mask, n_masked, mask_id, generator=None):
    """Mask exactly `n_masked` [B] response tokens of each example, chosen uniformly."""
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    draws = draws.masked_fill(~response_mask, 2.0)  # prompt positions sort last
    rank = draws.argsort(1).argsort(1)
    noised = (rank < n_masked[:, None]) & response_mask
    return input_ids.masked_fill(noised, mask_id), noised


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------

def diffusion_loss(model: DiffusionLM, input_ids, attention_mask, response_mask, instruction=None,
                   t=None, generator=None, reduction="mean", estimator: str = "exact_count", **_unused):
    """Masked-diffusion NELBO of the response given the prompt, per response token.

    The bound (LLaDA eq. 3, MDLM): E_t [ (1 / n) * sum_{masked j} CE(x_j) / t ], masks drawn
    independently with probability t, n = response length. Two unbiased estimators:

    * "bernoulli": exactly that, one t per example. The 1/t weight reaches 1/EPS, and with
      short responses (a one-word label) a rare masked token at small t dominates a batch.
    * "exact_count" (default): l = ceil(t * n) tokens masked, chosen uniformly, weight n / l,
      i.e. the mean CE over the masked tokens. Given l, Bernoulli masking is uniform over
      l-subsets, and integral_0^1 Binom(l; n, t) / t dt = 1 / l, so both have the same
      expectation (LLaDA eq. 6); here l ~ U{1..n} because t ~ U(0, 1].

    The denoiser (and a step-aware method's hook) sees the masking rate t with "bernoulli",
    and the masked fraction l / n with "exact_count": that is the t the sampler gives it at
    a state with l of n positions masked, so a step-aware method is trained on the very
    (state, t) pairs it meets when sampling. (Passing the drawn t instead trained it, for
    a 2-token answer, on t in (0, 1/2] with one token masked, while the sampler calls it at
    exactly t = 1/2: only a sixth of those examples reached the phase the sampler uses.)
    """
    if estimator not in ("exact_count", "bernoulli"):
        raise ValueError(f"estimator must be 'exact_count' or 'bernoulli', not {estimator!r}")
    batch_size = input_ids.shape[0]
    if t is None:
        t = sample_times(batch_size, generator, input_ids.device)
    n_response = response_mask.sum(1).clamp(min=1)
    mask_id = model.backbone.mask_id
    if estimator == "bernoulli":
        t = mask_rate(t)
        noised_ids, noised = add_noise(input_ids, response_mask, t, mask_id, generator)
        weight = 1 / t / n_response
    else:
        t = t.clamp(EPS, 1.0)
        n_masked = torch.minimum(torch.ceil(t * n_response - 1e-6).long().clamp(min=1), n_response)
        noised_ids, noised = mask_exactly(input_ids, response_mask, n_masked, mask_id, generator)
        weight = 1 / n_masked
        t = n_masked / n_response
    logits = model(noised_ids, attention_mask, t, instruction, positions=noised)
    token_ce = F.cross_entropy(logits, input_ids[noised], reduction="none")
    example_of_token = noised.nonzero()[:, 0]
    per_example = torch.zeros(batch_size, device=logits.device).index_add(0, example_of_token, token_ce)
    per_example = per_example * weight
    return per_example.mean() if reduction == "mean" else per_example


@torch.no_grad()
def nelbo(model: DiffusionLM, batches, samples_per_sequence: int = 8, seed: int = 0,
          estimator: str = "exact_count") -> dict:
    """Held-out NELBO in nats per response token and the perplexity bound exp(NELBO).

    Each sequence is scored at `samples_per_sequence` stratified times; the result is
    token-weighted over all sequences.
    """
    generator = torch.Generator().manual_seed(seed)
    total, tokens = 0.0, 0
    for batch in batches:
        n_response = batch["response_mask"].sum(1)
        for k in range(samples_per_sequence):
            # Stratify over the k draws too: draw k covers [k/K, (k+1)/K).
            u = torch.rand(len(n_response), generator=generator)
            t = (k + u) / samples_per_sequence
            per_example = diffusion_loss(model, **batch, t=t.to(n_response.device),
                                         generator=generator, reduction="none", estimator=estimator)
            total += float((per_example * n_response).sum()) / samples_per_sequence
        tokens += int(n_response.sum())
    value = total / max(tokens, 1)
    return {"nelbo": value, "ppl_bound": math.exp(min(value, 50.0)), "tokens": tokens}


# ---------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    """What happened at each sampler step (for the analyses)."""

    t: list = field(default_factory=list)             # float per step
    tokens: list = field(default_factory=list)        # [B, L] after the step
    hidden: list = field(default_factory=list)        # [N_response, d]: h at response positions
    perturbation: list = field(default_factory=list)  # [N_response, d] or None per step
    revealed: list = field(default_factory=list)      # [B, L] bool: positions revealed this step


def _predict(logits, temperature: float, remasking: str, generator, sep_id: int | None):
    """(prediction, confidence) per masked position: argmax or a tempered draw; its probability
    (low_confidence) or a random number. With `sep_id`, [SEP] predictions rank below all others
    (their confidence is lowered by 2, so it stays below any other one)."""
    if temperature > 0:
        pred = torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=generator).squeeze(1)
    else:
        pred = logits.argmax(-1)
    if remasking == "low_confidence":
        confidence = logits.float().softmax(-1).gather(1, pred[:, None]).squeeze(1)
    else:
        confidence = torch.rand(pred.shape, generator=generator).to(logits.device)
    if sep_id is not None:  # confidences are in [0, 1]: [SEP]s rank below the rest, in their own order
        confidence = torch.where(pred == sep_id, confidence - 2.0, confidence)
    return pred, confidence


def _scores(confidence, candidates, masked):
    """[B, L] confidence at each candidate position, -inf elsewhere.

    `confidence` holds one value per True of `masked` (the positions the model predicted).
    """
    full = torch.full(masked.shape, -math.inf, device=masked.device)
    full[masked] = confidence
    full[~candidates] = -math.inf
    return full


def _most_confident(confidence, candidates, masked, counts):
    """[B, L] bool: the `counts` [B] most confident of each row's candidate positions."""
    full = _scores(confidence, candidates, masked)
    rank = full.argsort(1, descending=True).argsort(1)
    return (rank < counts[:, None]) & candidates


def _reveal_counts(n_candidates: torch.Tensor, steps: int) -> torch.Tensor:
    """How many positions to reveal at each of `steps` steps: [steps, B], summing to n."""
    remaining = [torch.div(n_candidates * (steps - s), steps, rounding_mode="floor") for s in range(steps + 1)]
    # remaining[s] = how many are still masked before step s; the difference is revealed.
    return torch.stack([remaining[s] - remaining[s + 1] for s in range(steps)])


def _above_threshold(confidence, candidates, masked, threshold: float):
    """[B, L] bool: the candidate positions whose prediction is at least `threshold` sure.

    A [SEP] prediction (confidence lowered by 2 in `_predict`) counts only once no other
    prediction is left among its row's candidates, as `sep_last` orders them.
    """
    full = _scores(confidence, candidates, masked)
    is_sep = full < -0.5
    words_left = (candidates & ~is_sep).any(1, keepdim=True)
    sure = torch.where(is_sep, full + 2.0, full) >= threshold
    return candidates & sure & (~is_sep | ~words_left)


@torch.no_grad()
def _check_sampler(steps, remasking, block_length, temperature, threshold=None) -> None:
    if remasking not in ("low_confidence", "random"):
        raise UserError(f"remasking must be 'low_confidence' or 'random', not {remasking!r}")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"the sampler needs at least one denoising step, not {steps!r}")
    if block_length is not None and block_length < 1:
        raise UserError(f"the block length must be at least 1, not {block_length!r}")
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise UserError(f"the temperature must be a number from 0 to {MAX_TEMPERATURE:g}, not {temperature!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise UserError(f"the confidence threshold must be a number in (0, 1], not {threshold!r}")
    if threshold is not None and remasking != "low_confidence":
        raise UserError("a confidence threshold needs remasking='low_confidence' (random remasking has no confidence)")


def _one_sampler_at_a_time(fn):
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with model.sampling:
            return fn(model, *args, **kwargs)
    return wrapper


@_one_sampler_at_a_time
def sample(model: DiffusionLM, input_ids, attention_mask, response_mask, instruction=None,
           steps: int = 64, remasking: str = "low_confidence", block_length: int | None = None,
           temperature: float = 0.0, generator=None, record: bool = False, sep_last: bool = True,
           threshold: float | None = None, **_unused):
    """Generate the response positions of `input_ids`; returns (tokens [B, L], Trajectory | None).

    Whatever sits at response positions on input is ignored (they start as [MASK]).
    The response is cut into n_blocks = ceil(L / block_length) blocks (one block without
    `block_length`), each decoded in max(1, min(steps // n_blocks, block_length)) model
    calls: a step that revealed nothing would leave the state unchanged. So steps=4, L=6,
    block_length=2 gives 3 calls, one per block.

    `threshold` (Fast-dLLM's parallel decoding): instead of a fixed schedule, each call
    reveals every masked position of the block predicted with at least that probability,
    and at least the most confident one per row, so a block takes between 1 and
    block_length calls (`steps` is then unused); the step's t is each row's masked fraction.

    `sep_last` (LLaDA's `confidence_eos_eot_inf`, their Appendix B.3): a position predicted
    as [SEP] is revealed only after every position predicted as something else. The [SEP]
    filler is most of every training response, so a fine-tuned model is surest of it
    everywhere, and plain low-confidence remasking fills the response with [SEP] from the
    end inwards, down to an empty answer (measured: AG News titles, all empty).
    """
    _check_sampler(steps, remasking, block_length, temperature, threshold)
    mask_id = model.backbone.mask_id
    x = input_ids.masked_fill(response_mask, mask_id)
    # Ordinal of each response position inside its example's response (0, 1, 2, ...).
    ordinal = response_mask.long().cumsum(1) - 1
    n_response = response_mask.sum(1)
    longest = int(n_response.max()) if len(n_response) else 0
    block_length = block_length or max(longest, 1)
    n_blocks = max(1, math.ceil(longest / block_length))
    steps_per_block = max(1, min(steps // n_blocks if steps >= n_blocks else 1, block_length))
    total_steps = n_blocks * steps_per_block
    trajectory = Trajectory() if record else None

    step = 0
    for block in range(n_blocks):
        in_block = response_mask & (ordinal >= block * block_length) & (ordinal < (block + 1) * block_length)
        counts = _reveal_counts(in_block.sum(1), steps_per_block)
        for s in range(steps_per_block if threshold is None else block_length):
            masked = still_masked(x, response_mask, mask_id)
            if threshold is None:
                t_now = (total_steps - step) / total_steps
                t = torch.full((x.shape[0],), t_now, device=x.device)
            elif not (masked & in_block).any():
                break  # every row's block is decoded
            else:
                t = masked.sum(1).float() / n_response.clamp(min=1)
                t_now = float(t.mean())
            logits, h, delta = model.denoise(x, attention_mask, t, instruction, positions=masked)
            model.sampler_calls += 1
            pred, confidence = _predict(logits, temperature, remasking, generator,
                                        model.backbone.sep_id if sep_last else None)
            candidates = masked & in_block
            if threshold is None:
                reveal = _most_confident(confidence, candidates, masked, counts[s])
            else:
                reveal = (_most_confident(confidence, candidates, masked, candidates.any(1).long())
                          | _above_threshold(confidence, candidates, masked, threshold))
            full_pred = torch.full_like(x, mask_id)
            full_pred[masked] = pred
            x = torch.where(reveal, full_pred, x)
            if record:
                trajectory.t.append(t_now)
                trajectory.tokens.append(x.clone())
                trajectory.revealed.append(reveal.clone())
                trajectory.hidden.append(h[response_mask].float().clone())
                trajectory.perturbation.append(None if delta is None else delta[response_mask].float().clone())
            step += 1
    return x, trajectory
