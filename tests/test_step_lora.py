"""The step-aware rivals `nara` (B C(t) A) and `tlora` (B M(t) A) on a tiny random base.

tests/test_methods.py covers them too (it is parametrised over every registered method):
accounting against the formula and the file, reload, detach, training only their own
tensors. Here: what is particular to a weight update that depends on the step.
"""

import pytest
import torch

from conftest import perturb, tiny_batch
from lora_diffusion.adapters import load_adapter
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import batch_schedule, collate, encode, load_task
from lora_diffusion.diffusion import DiffusionLM, diffusion_loss
from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS, make_method
from lora_diffusion.training import TrainConfig, train
from test_methods import attached, logits, save

STEP_AWARE = ["nara", "tlora"]


def test_registered_after_dora_and_not_mergeable():
    names = list(METHODS)
    assert names.index("nara") == names.index("dora") + 1 and names.index("tlora") == names.index("nara") + 1
    assert not METHODS["nara"].can_merge and not METHODS["tlora"].can_merge
    assert make_method("nara").default_lr == make_method("lora").default_lr == 2e-3


@pytest.mark.parametrize("name", STEP_AWARE)
def test_starts_equal_to_the_base_at_every_step(name, tiny):
    batch = tiny_batch(tiny, padded=True)
    base = DiffusionLM(tiny_backbone(seed=0))
    model, _ = attached(name)
    for t in (0.0, 0.5, 1.0):
        assert torch.equal(logits(model, batch, t), logits(base, batch, t))


@pytest.mark.parametrize("name", STEP_AWARE)
def test_a_training_step_changes_only_the_methods_tensors(name, tiny):
    model, method = attached(name)
    perturb(method)  # past B = 0 (and H's zero last layer), so every tensor gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(method.trainable_parameters().values(), lr=1e-2)
    model.train()
    diffusion_loss(model, **tiny_batch(tiny, padded=True), t=torch.tensor([0.9, 0.5, 0.1, 0.8]),
                   generator=torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    own = {n for n, p in model.named_parameters() if any(p is q for q in method.trainable_parameters().values())}
    assert own and all(n.startswith(f"{name}.") for n in own)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in own), n


@pytest.mark.parametrize("name,options", [("nara", {}), ("nara", {"r": 4, "time_dim": 8, "hidden": 16,
                                                                   "targets": "attention+mlp"}),
                                          ("tlora", {}), ("tlora", {"r": 8, "r_min": 8})])
def test_accounting_equals_the_formula_and_the_saved_file(name, options, tmp_path, tiny):
    model, method = attached(name, **options)
    perturb(method)
    acc = method.accounting()
    c = method.config
    n_weights = 12 if c.targets == "attention+mlp" else 8  # 2 blocks of the tiny base
    d, ffn = tiny.hidden_size, 4 * tiny.hidden_size
    factors = 8 * c.r * 2 * d if c.targets == "attention" else c.r * (8 * 2 * d + 2 * 2 * (d + ffn))
    hypernetwork = (c.time_dim * c.hidden + c.hidden + c.hidden * c.r ** 2 + c.r ** 2) if name == "nara" else 0
    assert acc["adapted_weights"] == n_weights
    assert acc["formula_total"] == acc["trainable_parameters"] == factors + hypernetwork
    expected = logits(model, tiny_batch(tiny, padded=True), 0.3)
    save(tmp_path, model, method)
    loaded, loaded_method, config = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    file_tensors = loaded_method.state_dict()
    assert sum(t.numel() for t in file_tensors.values()) == acc["trainable_parameters"]
    assert config["options"] == method.options() and config["accounting"]["formula_total"] == acc["formula_total"]
    assert torch.equal(logits(loaded, tiny_batch(tiny, padded=True), 0.3), expected)


@pytest.mark.parametrize("name", STEP_AWARE)
def test_detach_restores_the_base_exactly(name, tiny):
    batch = tiny_batch(tiny, padded=True)
    base = logits(DiffusionLM(tiny_backbone(seed=0)), batch)
    model, method = attached(name)
    perturb(method)
    assert not torch.equal(logits(model, batch), base)
    method.detach()
    assert torch.equal(logits(model, batch), base)
    assert not hasattr(model, name) and not model.grad_through_body
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_nara_core_depends_on_the_step_where_lora_would_not(tiny):
    batch = tiny_batch(tiny)
    model, method = attached("nara")
    with torch.no_grad():  # B != 0 but H still at zero: C(t) = I, plain LoRA, the same at every step
        for factors in method.adapter.factors.values():
            factors.B.normal_(0, 0.1)
    assert torch.allclose(logits(model, batch, 0.9), logits(model, batch, 0.1), atol=1e-6)
    perturb(method)  # now H(e(t)) != 0: the update itself moves with t
    assert not torch.allclose(logits(model, batch, 0.9), logits(model, batch, 0.1), atol=1e-3)
    core = method.core(torch.tensor([0.9, 0.1]))
    assert core.shape == (2, 16, 16) and not torch.allclose(core[0], core[1])
    # one C(t) per example: a mixed batch gives each row what it gets alone
    times = (0.9, 0.1, 0.9, 0.1)
    with torch.no_grad():
        mixed = model(batch["input_ids"], batch["attention_mask"], torch.tensor(times), batch["instruction"])
        alone = {v: model(batch["input_ids"], batch["attention_mask"], torch.full((4,), v), batch["instruction"])
                 for v in set(times)}
    for row, v in enumerate(times):
        assert torch.allclose(mixed[row], alone[v][row], atol=1e-5)


def test_tlora_active_ranks_follow_the_schedule():
    method = make_method("tlora", {"r": 16, "r_min": 4})
    t = torch.tensor([1.0, 0.75, 0.5, 1 / 3, 0.25, 0.0])
    assert method.active_ranks(t).tolist() == [4, 7, 10, 12, 13, 16]  # floor(12 (1 - t)) + 4
    assert make_method("tlora", {"r": 16}).config.min_rank() == 4  # none = r // 4
    assert make_method("tlora", {"r": 2}).config.min_rank() == 1
    with pytest.raises(UserError, match="r_min"):
        make_method("tlora", {"r": 8, "r_min": 9})
    with pytest.raises(UserError, match="r_min"):
        make_method("tlora", {"r_min": 0})
    with pytest.raises(UserError, match="time_dim"):
        make_method("nara", {"time_dim": 7})


def test_tlora_at_full_noise_only_the_first_r_min_ranks_act(tiny):
    """B non-zero only on ranks past r_min: at t = 1 the model is the base, at t = 0 it is not."""
    batch = tiny_batch(tiny)
    base = DiffusionLM(tiny_backbone(seed=0))
    model, method = attached("tlora", r=8, r_min=3)
    with torch.no_grad():
        for factors in method.adapter.factors.values():
            factors.B[:, 3:].normal_(0, 0.5)
    assert torch.equal(logits(model, batch, 1.0), logits(base, batch, 1.0))
    assert not torch.allclose(logits(model, batch, 0.0), logits(base, batch, 0.0), atol=1e-3)
    with torch.no_grad():  # and the first r_min ranks do act at t = 1
        for factors in method.adapter.factors.values():
            factors.B[:, :3].normal_(0, 0.5)
    assert not torch.allclose(logits(model, batch, 1.0), logits(base, batch, 1.0), atol=1e-3)


def test_calling_the_backbone_without_a_step_is_refused(tiny):
    model, method = attached("tlora")
    batch = tiny_batch(tiny)
    with pytest.raises(UserError, match="denoising step"):
        model.backbone.hidden_states(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("name", STEP_AWARE)
def test_a_short_run_on_the_built_in_task_lowers_the_loss(name):
    # One 64-wide layer: on the 32-wide conftest base even weight LoRA moves the loss by
    # only ~0.2 nats in 60 steps; here 40 steps take nara, tlora and lora down by 0.4-0.65.
    backbone = tiny_backbone(seed=0, hidden=64, layers=1, heads=2)
    task = load_task("suite_topic", max_train=32)
    enc = encode(backbone.tokenizer, task.train, 2, 96)
    everything = collate(enc, range(len(enc.prompts)), backbone.pad_id)
    model, method = DiffusionLM(backbone), make_method(name)
    method.attach(model)

    def loss():  # the same masks and times each time
        with torch.no_grad():
            return float(diffusion_loss(model, **everything, generator=torch.Generator().manual_seed(0)))

    before = loss()
    order = batch_schedule(len(enc.prompts), 8, seed=0)
    train(model, method, lambda step, micro: collate(enc, order(step), backbone.pad_id),
          TrainConfig(steps=40, batch_size=8, checkpoint_every=0, log_every=10, device="cpu"), progress=False)
    after = loss()
    assert after < before - 0.25, (before, after)
