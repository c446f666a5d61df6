"""What a fine-tuned model changes along the denoising trajectory.

`perturbation_trajectories` runs the sampler with a fine-tuned model on an eval batch
and, at every step, records the perturbation of the final hidden states at the response
positions:

* LoRA-Diffusion with `final` injection: its own delta_t (what the step hook added);
* every other method (and LoRA-Diffusion with `blocks` injection): h_t of the fine-tuned
  model minus h_t of the base, both computed on the same partly-revealed input x_t.

The base's own hidden states on those inputs come along, for the trajectory t-SNE.
`effective_rank` turns a stack of perturbations into exp(entropy of the normalised
singular values) (Roy & Vetterli, 2007), the measure the paper uses.

`denoising_trajectory` decodes one prompt and returns the unmasking step by step as
plain data (token strings, their state, the step's perturbation norm), for the app's
Generate tab and the notebooks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..data import Encoded, answer_ids, collate, encode_prompt
from ..diffusion import DiffusionLM, sample, still_masked
from ..errors import UserError


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)), p = singular values / their sum; 0 for an all-zero matrix."""
    s = torch.linalg.svdvals(matrix.double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class PerturbationTrajectory:
    """Per sampler step: the perturbations and base hidden states at the response positions."""

    t: list[float]                        # time of each step
    perturbation: list[torch.Tensor]      # per step [N_tokens, d]
    base_hidden: list[torch.Tensor]       # per step [N_tokens, d]
    example: torch.Tensor                 # [N_tokens]: which example each row belongs to
    source: str                           # "delta" (the method's own) or "difference" (fine-tuned - base)


def sampled_steps(model: DiffusionLM, enc: Encoded, steps: int, batch_size: int, seed: int):
    """Sample with `model` on `enc` batch by batch; yields (idx, batch, trajectory, inputs).

    inputs[s] is what step s saw: the all-[MASK] response, then the state after step s - 1.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(enc.prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc.prompts))))
        batch = {k: v.to(device) for k, v in collate(enc, idx, model.backbone.pad_id).items()}
        _, traj = sample(model, **batch, steps=steps, generator=generator, record=True)
        inputs = [batch["input_ids"].masked_fill(batch["response_mask"], model.backbone.mask_id)] + traj.tokens[:-1]
        yield idx, batch, traj, inputs


@torch.no_grad()
def perturbation_trajectories(model: DiffusionLM, base: DiffusionLM, enc: Encoded, steps: int = 16,
                              batch_size: int = 32, seed: int = 0) -> PerturbationTrajectory:
    """Sample with `model` on every example of `enc` and collect per-step perturbations."""
    device = next(model.parameters()).device
    uses_delta = bool(model.step_hooks)  # only LoRA-Diffusion (final) perturbs through a step hook
    per_step_delta, per_step_base, examples, times = None, None, [], None
    for idx, batch, traj, inputs in sampled_steps(model, enc, steps, batch_size, seed):
        response = batch["response_mask"]
        deltas, bases = [], []
        for s, x in enumerate(inputs):
            t = torch.full((len(idx),), traj.t[s], device=device)
            h_base = base.backbone.hidden_states(x, batch["attention_mask"])[response].float()
            if uses_delta:
                delta = traj.perturbation[s]
            else:
                h_model = model.denoise(x, batch["attention_mask"], t, batch["instruction"],
                                        positions=still_masked(x, response, model.backbone.mask_id))[1]
                delta = h_model[response].float() - h_base
            deltas.append(delta.cpu())
            bases.append(h_base.cpu())
        if per_step_delta is None:
            per_step_delta, per_step_base, times = deltas, bases, traj.t
        else:
            per_step_delta = [torch.cat([a, b]) for a, b in zip(per_step_delta, deltas)]
            per_step_base = [torch.cat([a, b]) for a, b in zip(per_step_base, bases)]
        rows = response.sum(1).cpu()
        examples.append(torch.repeat_interleave(torch.tensor(idx), rows))
    return PerturbationTrajectory(times, per_step_delta, per_step_base, torch.cat(examples),
                                  "delta" if uses_delta else "difference")


@contextlib.contextmanager
def block_outputs(backbone):
    """{block index: its output hidden states [B, L, d]} of the forward passes run inside the block.

    The hooks go after any a method registered, so they see what the method made of the
    output (LoRA-Diffusion's `blocks` perturbation included).
    """
    outputs = {}

    def capture(i):
        def hook(module, args, output):
            outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [block.register_forward_hook(capture(i)) for i, block in enumerate(backbone.blocks())]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def effective_rank_per_layer(model: DiffusionLM, base: DiffusionLM, enc: Encoded, steps: int = 16,
                             batch_size: int = 32, seed: int = 0) -> dict:
    """Effective rank (and mean norm) of each block's output change, fine-tuned - base, per step.

    Both models read the same partly-revealed inputs the fine-tuned model's sampler went
    through; rows are the response positions. A perturbation after the last block
    (LoRA-Diffusion `final`) changes no block's output, so it shows as zeros here.
    """
    device = next(model.parameters()).device
    diffs = None  # [step][block] -> list of [N_tokens, d]
    times = None
    for idx, batch, traj, inputs in sampled_steps(model, enc, steps, batch_size, seed):
        response, mask = batch["response_mask"], batch["attention_mask"]
        times = traj.t
        for s, x in enumerate(inputs):
            with block_outputs(model.backbone) as mine:
                model.denoise(x, mask, torch.full((len(idx),), traj.t[s], device=device), batch["instruction"],
                              positions=still_masked(x, response, model.backbone.mask_id))
            with block_outputs(base.backbone) as theirs:
                base.backbone.hidden_states(x, mask)
            if diffs is None:
                diffs = [[[] for _ in mine] for _ in inputs]
            for layer in range(len(mine)):
                diffs[s][layer].append((mine[layer][response].float() - theirs[layer][response].float()).cpu())
    stacks = [[torch.cat(parts) for parts in step] for step in diffs]
    return {"t": times, "blocks": len(stacks[0]),
            "effective_rank": [[effective_rank(d) for d in step] for step in stacks],
            "mean_norm": [[float(d.norm(dim=-1).mean()) for d in step] for step in stacks]}


def effective_rank_per_step(trajectory: PerturbationTrajectory) -> dict:
    """{"t": [...], "effective_rank": [...], "norm": [...]} over the sampler's steps."""
    return {"t": trajectory.t,
            "effective_rank": [effective_rank(d) for d in trajectory.perturbation],
            "mean_norm": [float(d.norm(dim=-1).mean()) for d in trajectory.perturbation],
            "rows": int(trajectory.perturbation[0].shape[0]) if trajectory.perturbation else 0,
            "source": trajectory.source}


def per_example(trajectory: PerturbationTrajectory, which: str = "perturbation") -> tuple[torch.Tensor, list]:
    """One vector per (example, step): the mean over the example's response tokens.

    Returns (X [n_examples * n_steps, d], [(example, step, t), ...]).
    """
    stacks = trajectory.perturbation if which == "perturbation" else trajectory.base_hidden
    n_examples = int(trajectory.example.max()) + 1
    vectors, labels = [], []
    counts = torch.bincount(trajectory.example, minlength=n_examples).clamp(min=1).unsqueeze(1).float()
    for s, stack in enumerate(stacks):
        sums = torch.zeros(n_examples, stack.shape[1]).index_add_(0, trajectory.example, stack)
        vectors.append(sums / counts)
        labels += [(e, s, trajectory.t[s]) for e in range(n_examples)]
    return torch.cat(vectors), labels


@torch.no_grad()
def denoising_trajectory(model: DiffusionLM, instruction: str, text: str, length: int = 8, steps: int = 8,
                         temperature: float = 0.0, seed: int = 0, remasking: str = "low_confidence") -> dict:
    """Decode one prompt; per step the response tokens, their state and the perturbation norm.

    state per position: "masked", "new" (revealed at this step) or "settled". The norm is
    the mean L2 norm over response positions of what the model's step hooks added to h_t
    (None for a model without any, e.g. the base or a merged weight LoRA).
    """
    if not instruction.strip() and not text.strip():
        raise UserError("type an instruction or an input")
    if length < 1 or steps < 1:
        raise UserError("length and steps must be at least 1")
    backbone = model.backbone
    tok = backbone.tokenizer
    enc = encode_prompt(tok, instruction, text, length, backbone.max_length, truncate=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(enc, [0], backbone.pad_id).items()}
    tokens, trajectory = sample(model, **batch, steps=steps, temperature=temperature, remasking=remasking,
                                generator=torch.Generator().manual_seed(seed), record=True)
    response = batch["response_mask"][0]
    frames = []
    for t, x, revealed, delta in zip(trajectory.t, trajectory.tokens, trajectory.revealed,
                                     trajectory.perturbation):
        ids = x[0][response].tolist()
        frames.append({"t": t, "tokens": tok.convert_ids_to_tokens(ids),
                       "state": ["new" if n else "masked" if i == backbone.mask_id else "settled"
                                 for i, n in zip(ids, revealed[0][response].tolist())],
                       "perturbation_norm": None if delta is None else float(delta.norm(dim=-1).mean())})
    answer = answer_ids(tokens[0][response].tolist(), backbone.sep_id)
    return {"instruction": instruction, "input": text, "steps": frames,
            "answer": tok.decode(answer, skip_special_tokens=True)}
