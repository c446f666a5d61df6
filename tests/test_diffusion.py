"""The forward process, the loss and the sampler (diffusion.py)."""

import math
import threading

import pytest
import torch
from torch import nn

from conftest import tiny_batch

from lora_diffusion.diffusion import (EPS, DiffusionLM, _reveal_counts, add_noise, diffusion_loss, mask_rate,
                                      nelbo, sample, sample_times)

MASK = 103


make_batch = tiny_batch


# --- schedule -------------------------------------------------------------------------

def test_log_linear_schedule_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101)
    rate = mask_rate(t)
    assert rate[0].item() == pytest.approx(EPS)
    assert rate[-1].item() == pytest.approx(1.0)
    assert torch.all(rate[1:] > rate[:-1])


def test_sample_times_stratified():
    t = sample_times(8, torch.Generator().manual_seed(3))
    assert torch.all((t >= 0) & (t < 1))
    # exactly one draw in each of the 8 bins
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))


def test_add_noise_masks_only_response_at_the_given_rate():
    ids = torch.randint(1000, 5000, (64, 200))
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 50:] = True
    rate = torch.full((64,), 0.3)
    noised, masked = add_noise(ids, response, rate, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(noised[:, :50], ids[:, :50])  # prompt never noised
    assert torch.all(noised[masked] == MASK) and torch.equal(noised[~masked], ids[~masked])
    assert masked[:, 50:].float().mean().item() == pytest.approx(0.3, abs=0.01)
    all_masked, m1 = add_noise(ids, response, torch.ones(64), MASK, torch.Generator())
    assert torch.equal(m1, response)


# --- loss -----------------------------------------------------------------------------

class UniformLogits(nn.Module):
    """Records what the loss asks of the denoiser and answers with uniform logits."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.calls = []

    def forward(self, input_ids, attention_mask, t, instruction=None, positions=None):
        self.calls.append((input_ids.clone(), t.clone(), positions.clone()))
        return torch.zeros(int(positions.sum()), 30522, requires_grad=True)


def test_bernoulli_loss_uses_masked_response_positions_only_with_1_over_t_weight(tiny):
    batch = make_batch(tiny)
    model = UniformLogits(tiny)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    per_example = diffusion_loss(model, **batch, t=t, generator=torch.Generator().manual_seed(1),
                                 reduction="none", estimator="bernoulli")
    noised_ids, t_seen, positions = model.calls[0]
    assert torch.allclose(t_seen, mask_rate(t))  # the denoiser (and its hook) sees the mask rate
    assert torch.equal(positions, noised_ids == tiny.mask_id)  # predictions only where masked
    assert not positions[~batch["response_mask"]].any()
    assert torch.equal(noised_ids[~batch["response_mask"]], batch["input_ids"][~batch["response_mask"]])
    # uniform logits: CE = log V per masked token; loss_i = n_masked_i * log V / rate_i / n_i
    expected = positions.sum(1) * math.log(30522) / mask_rate(t) / 5
    assert torch.allclose(per_example, expected, rtol=1e-5)
    assert positions[3, 6:].all()  # t = 1 masks the whole response


def test_exact_count_loss_masks_ceil_t_n_tokens_and_averages_their_ce(tiny):
    batch = make_batch(tiny)  # 5 response tokens
    model = UniformLogits(tiny)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    per_example = diffusion_loss(model, **batch, t=t, generator=torch.Generator().manual_seed(1), reduction="none")
    noised_ids, t_seen, positions = model.calls[0]
    assert positions.sum(1).tolist() == [1, 2, 4, 5]  # ceil(t * 5)
    # the denoiser sees the masked fraction l / n, the t the sampler passes at that state
    assert torch.allclose(t_seen, torch.tensor([1, 2, 4, 5]) / 5)
    assert not positions[~batch["response_mask"]].any()
    assert torch.equal(noised_ids[~batch["response_mask"]], batch["input_ids"][~batch["response_mask"]])
    # the mean CE over the masked tokens: log V for uniform logits, whatever t is
    assert torch.allclose(per_example, torch.full((4,), math.log(30522)), rtol=1e-5)


def test_both_estimators_have_the_same_expectation_and_exact_count_less_variance(tiny):
    """Monte Carlo: the two estimators of the bound agree within their standard errors."""
    model = DiffusionLM(tiny)
    one = make_batch(tiny, n=1, response_len=4, seed=3)
    n = 1024
    batch = {k: v.expand(n, -1).contiguous() for k, v in one.items()}
    stats = {}
    for estimator in ("bernoulli", "exact_count"):
        with torch.no_grad():
            values = diffusion_loss(model, **batch, generator=torch.Generator().manual_seed(0),
                                    reduction="none", estimator=estimator)
        stats[estimator] = (values.mean().item(), values.std().item() / math.sqrt(n), values.std().item())
    (m1, se1, sd1), (m2, se2, sd2) = stats["bernoulli"], stats["exact_count"]
    assert abs(m1 - m2) < 4 * math.sqrt(se1 ** 2 + se2 ** 2)
    assert sd2 < sd1 / 2  # the point of the exact-count form


def test_loss_is_differentiable_and_trains_the_tiny_model(tiny):
    model = DiffusionLM(tiny)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = make_batch(tiny)
    loss = diffusion_loss(model, **batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in tiny.mlm.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for p in model.parameters():
        p.grad = None


def test_frozen_body_runs_without_a_graph(tiny):
    model = DiffusionLM(tiny)
    for p in model.parameters():
        p.requires_grad_(False)
    seen = {}

    def hook(h, context):
        seen["requires_grad"] = h.requires_grad
        return torch.zeros_like(h)

    model.add_step_hook(hook)
    batch = make_batch(tiny)
    model(batch["input_ids"], batch["attention_mask"], torch.ones(4), positions=batch["response_mask"])
    assert seen["requires_grad"] is False


def test_nelbo_is_finite_and_ppl_is_its_exp(tiny_model, tiny):
    result = nelbo(tiny_model, [make_batch(tiny, seed=s) for s in range(2)], samples_per_sequence=2)
    assert math.isfinite(result["nelbo"]) and result["nelbo"] > 0
    assert result["ppl_bound"] == pytest.approx(math.exp(result["nelbo"]))
    assert result["tokens"] == 2 * 4 * 5


# --- sampler --------------------------------------------------------------------------

def test_reveal_counts_sum_to_n():
    n = torch.tensor([0, 1, 5, 17])
    counts = _reveal_counts(n, 4)
    assert torch.equal(counts.sum(0), n)
    assert torch.all(counts >= 0)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("block_length", [None, 2])
def test_sampler_invariants(tiny_model, tiny, remasking, block_length):
    batch = make_batch(tiny, n=3, response_len=6)
    tokens, traj = sample(tiny_model, **batch, steps=64, remasking=remasking, block_length=block_length,
                          temperature=1.0, generator=torch.Generator().manual_seed(0), record=True)
    prompt = ~batch["response_mask"]
    previous = batch["input_ids"].masked_fill(batch["response_mask"], tiny.mask_id)
    for step_tokens in traj.tokens:
        assert torch.equal(step_tokens[prompt], batch["input_ids"][prompt])  # prompt never changes
        was_revealed = previous != tiny.mask_id
        assert torch.equal(step_tokens[was_revealed], previous[was_revealed])  # revealed tokens stay
        previous = step_tokens
    assert not (tokens == tiny.mask_id).any()  # all masks gone after the last step
    assert len(traj.t) == 6  # min(T, response length) model calls
    assert traj.t[0] == 1.0 and all(a > b for a, b in zip(traj.t, traj.t[1:]))
    assert traj.hidden[0].shape == (3 * 6, tiny.hidden_size)
    if block_length:  # semi-autoregressive: block 2 untouched until block 1 is done
        first_block = batch["response_mask"].clone()
        first_block[:, 6 + 2:] = False
        for step_tokens in traj.tokens:
            later = step_tokens[:, 6 + 2:]
            if (later != tiny.mask_id).any():
                assert not (step_tokens[first_block] == tiny.mask_id).any()


def test_sampler_is_deterministic_under_a_seed(tiny_model, tiny):
    batch = make_batch(tiny, n=4, response_len=8)
    run = lambda seed: sample(tiny_model, **batch, steps=8, remasking="random", temperature=1.0,
                              generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_step_hook_gets_t_and_changes_the_output(tiny):
    model = DiffusionLM(tiny)
    batch = make_batch(tiny, n=2, response_len=4)
    seen = []

    def hook(h, context):
        seen.append(context.t[0].item())
        assert context.instruction is batch["instruction"]
        assert model.step_context is None  # set only while the body runs
        return 50.0 * torch.randn(h.shape, generator=torch.Generator().manual_seed(len(seen)))

    plain, _ = sample(model, **batch, steps=4)
    handle = model.add_step_hook(hook)
    hooked, traj = sample(model, **batch, steps=4, record=True)
    assert seen == traj.t == [1.0, 0.75, 0.5, 0.25]
    assert traj.perturbation[0] is not None and traj.perturbation[0].abs().sum() > 0
    assert not torch.equal(plain, hooked)
    handle.remove()  # the hook is gone: the sampler gives the base's tokens again
    again, traj = sample(model, **batch, steps=4, record=True)
    assert torch.equal(again, plain) and traj.perturbation[0] is None


def test_step_hooks_add_up(tiny):
    model = DiffusionLM(tiny)
    batch = make_batch(tiny, n=2, response_len=4)
    t = torch.full((2,), 0.5)
    one = lambda h, context: torch.ones_like(h)
    model.add_step_hook(one)
    model.add_step_hook(lambda h, context: 2 * torch.ones_like(h))
    _, h, delta = model.denoise(batch["input_ids"], batch["attention_mask"], t, positions=batch["response_mask"])
    assert torch.equal(delta, torch.full_like(h, 3.0))


class SurestOfSep(nn.Module):
    """A denoiser that predicts [SEP] (probability ~0.9) everywhere but at the first response
    position, where it predicts token 7 less surely (~0.5): a fine-tuned model in miniature."""

    def __init__(self, backbone, response_mask):
        super().__init__()
        self.backbone = backbone
        self.response_mask = response_mask
        self.sampler_calls = 0
        self.sampling = threading.RLock()  # what `sample` holds while it runs

    def denoise(self, input_ids, attention_mask, t, instruction=None, positions=None):
        first = self.response_mask.float().argmax(1)  # column of each row's first response position
        rows, cols = positions.nonzero(as_tuple=True)
        vocab = self.backbone.tokenizer.vocab_size
        logits = torch.zeros(len(rows), vocab)
        at_first = cols == first[rows]
        logits[at_first, 7] = math.log(0.5 * vocab)
        logits[~at_first, self.backbone.sep_id] = math.log(9 * vocab)
        return logits, torch.zeros(*input_ids.shape, self.backbone.hidden_size), None


@pytest.mark.parametrize("sep_last", [True, False])
def test_sep_last_reveals_sep_predictions_after_everything_else(tiny, sep_last):
    batch = make_batch(tiny, n=2, response_len=5)
    model = SurestOfSep(tiny, batch["response_mask"])
    tokens, traj = sample(model, **batch, steps=5, record=True, sep_last=sep_last)
    first = batch["response_mask"].float().argmax(1)
    revealed_first = traj.revealed[0].float().argmax(1)
    # the answer token goes first with sep_last; without it the surer [SEP]s go first
    assert torch.equal(revealed_first == first, torch.full((2,), sep_last))
    assert (tokens[torch.arange(2), first] == 7).all()


# --- parallel decoding (a confidence threshold) -----------------------------------------

@pytest.mark.parametrize("sep_last,threshold,calls", [(True, 0.8, 2), (True, 0.95, 5), (False, 0.8, 2)])
def test_threshold_reveals_every_sure_position_at_once_and_sep_last_still_holds(tiny, sep_last, threshold, calls):
    """SurestOfSep: [SEP] at ~0.9 everywhere, the answer token at ~0.33 first."""
    batch = make_batch(tiny, n=2, response_len=5)
    model = SurestOfSep(tiny, batch["response_mask"])
    tokens, traj = sample(model, **batch, steps=5, record=True, sep_last=sep_last, threshold=threshold)
    assert len(traj.t) == calls
    first = batch["response_mask"].float().argmax(1)
    assert (tokens[torch.arange(2), first] == 7).all() and not (tokens == tiny.mask_id).any()
    if sep_last:  # the answer alone first (it is not sure, but the surest non-[SEP]), then the [SEP]s
        assert traj.revealed[0].sum(1).tolist() == [1, 1]
    else:  # every sure [SEP] at once, the unsure answer last
        assert traj.revealed[0].sum(1).tolist() == [4, 4]


def test_an_unreachable_threshold_is_the_one_token_per_step_schedule(tiny_model, tiny):
    batch = make_batch(tiny, n=3, response_len=6)
    parallel, traj = sample(tiny_model, **batch, steps=64, threshold=1.0, record=True)
    fixed, _ = sample(tiny_model, **batch, steps=6)
    assert torch.equal(parallel, fixed) and len(traj.t) == 6
    assert traj.t[0] == 1.0 and traj.t[-1] == pytest.approx(1 / 6)  # t: the masked fraction, as in training


def test_threshold_refuses_nonsense(tiny_model, tiny):
    from lora_diffusion.errors import UserError

    batch = make_batch(tiny, n=1, response_len=3)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(UserError, match="confidence threshold must be a number in"):
            sample(tiny_model, **batch, threshold=bad)
    with pytest.raises(UserError, match="needs remasking='low_confidence'"):
        sample(tiny_model, **batch, threshold=0.9, remasking="random")


def test_evaluation_counts_the_model_calls_of_generation(tiny):
    from lora_diffusion.data import load_task
    from lora_diffusion.evaluate import evaluate_task

    task = load_task("suite_struct", max_train=16, max_eval=6)
    model = DiffusionLM(tiny)
    fixed = evaluate_task(model, task, steps=4, batch_size=3)
    assert fixed["model_calls"] == 4 and "threshold" not in fixed
    parallel = evaluate_task(model, task, steps=4, batch_size=3, threshold=1.0)
    assert parallel["model_calls"] == fixed["response_length"] and parallel["threshold"] == 1.0


def test_two_threads_sampling_with_one_model_each_see_their_own_step(tiny):
    # The step context (t, positions) lives on the model while its body runs; the app serves one
    # kept router to concurrent requests. Each sampler holds the model, so a hook inside the body
    # never reads another request's step.
    import time

    model = DiffusionLM(tiny)
    batches = {"two rows": make_batch(tiny, n=2, response_len=4), "three rows": make_batch(tiny, n=3, response_len=4)}
    wrong, errors, tokens = [], [], {}

    def inside_the_body(module, args, output):
        rows = (output[0] if isinstance(output, tuple) else output).shape[0]
        time.sleep(0.005)  # give the other thread its chance to start a step
        context = model.step_context
        if context is None or context.t.shape[0] != rows:
            wrong.append(threading.current_thread().name)

    def run(name):
        try:
            tokens[name] = sample(model, **batches[name], steps=4)[0]
        except Exception as e:  # a thread's exception would not fail the test by itself
            errors.append(repr(e))

    hook = model.backbone.blocks()[0].register_forward_hook(inside_the_body)
    threads = [threading.Thread(target=run, args=(name,), name=name) for name in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hook.remove()
    assert wrong == [] and errors == []
    assert {name: t.shape[0] for name, t in tokens.items()} == {"two rows": 2, "three rows": 3}
