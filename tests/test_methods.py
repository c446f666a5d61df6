"""The PEFT methods: accounting, zero-init, merging, adapter files (on a tiny random base)."""

import json
import struct

import pytest
import torch

from conftest import logits, perturb, tiny_batch
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import load_task
from lora_diffusion.diffusion import DiffusionLM, StepContext, diffusion_loss, phase_of
from lora_diffusion.errors import UserError
from lora_diffusion.adapters import load_adapter, save_adapter
from lora_diffusion.methods import METHODS, make_method
from lora_diffusion.methods import lora_diffusion as lora_diffusion_module
from lora_diffusion.methods.lora_diffusion import _shrink_singular_values

ALL = list(METHODS)
# Every method with its defaults, plus the variants that change what is trained.
VARIANTS = [(name, {}) for name in ALL] + [
    ("prefix", {"reparam": False}),
    ("lora_diffusion", {"injection": "weights", "ranks": [4, 2, 1]}),
    ("lora_diffusion", {"injection": "blocks", "blocks_positions": "all"}),
    ("lora_diffusion", {"injection": "weights", "phases": "shared", "ranks": [2, 1, 1]}),
]
# Methods whose trainable part starts at zero (or is the base itself): the adapted model
# starts equal to the base. Prefix tuning adds attention positions, so it does not.
STARTS_AT_BASE = ["full", "lora_diffusion", "lora", "dora", "adapter", "bitfit"]


def attached(name, seed=0, **options):
    model = DiffusionLM(tiny_backbone(seed=seed))
    method = make_method(name, options)
    method.attach(model)
    return model, method


def save(folder, model, method):
    """save_adapter as fine_tune calls it: with the fingerprint of the untouched base."""
    task = load_task("suite_topic", max_train=8, max_eval=4)
    return save_adapter(folder, method, model.backbone, tiny_backbone(seed=0).fingerprint(), task, 2, 128)


def safetensors_header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("name,options", VARIANTS)
def test_parameter_count_matches_formula_and_file(name, options, tmp_path):
    model, method = attached(name, **options)
    acc = method.accounting()
    trainable = method.trainable_parameters()
    assert acc["trainable_parameters"] == sum(p.numel() for p in trainable.values())
    assert acc["base_parameters"] == sum(p.numel() for p in tiny_backbone().mlm.parameters())
    assert acc["percent_of_base"] == pytest.approx(100 * acc["trainable_parameters"] / acc["base_parameters"])
    if "formula_total" in acc:
        assert acc["formula_total"] == acc["trainable_parameters"]
    save(tmp_path, model, method)
    path = tmp_path / "adapter.safetensors"
    assert path.stat().st_size - safetensors_header_bytes(path) == acc["adapter_bytes"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["accounting"]["trainable_parameters"] == acc["trainable_parameters"]


def test_lora_diffusion_formula_terms_for_the_final_injection():
    model, method = attached("lora_diffusion", injection="final")
    terms = method.accounting()["terms"]
    d, d_t, d_c = terms["d"], terms["d_t"], terms["d_c"]
    assert terms["ranks"] == [64, 32, 8] and terms["k"] == 2 and terms["sites"] == 1
    expected = sum(2 * ((d + d_t) * r + r * d + d_c * r + 2 * r) for r in (64, 32, 8)) + 2 * (d_t * d_t + d_t)
    assert method.n_trainable() == expected
    blocks = attached("lora_diffusion", injection="blocks")[1]
    assert blocks.accounting()["terms"]["sites"] == 2  # one per block of the tiny base
    assert blocks.n_trainable() == 2 * (expected - 2 * (d_t * d_t + d_t)) + 2 * (d_t * d_t + d_t)


@pytest.mark.parametrize("name", STARTS_AT_BASE)
def test_zero_init_methods_leave_the_base_unchanged_at_step_0(name, tiny):
    batch = tiny_batch(tiny, padded=True)
    base = logits(DiffusionLM(tiny_backbone(seed=0)), batch)
    model, _ = attached(name)
    assert torch.allclose(logits(model, batch), base, atol=1e-5)


def test_blocks_injection_also_starts_at_the_base_and_prefix_does_not(tiny):
    batch = tiny_batch(tiny, padded=True)
    base = logits(DiffusionLM(tiny_backbone(seed=0)), batch)
    assert torch.allclose(logits(attached("lora_diffusion", injection="blocks")[0], batch), base, atol=1e-5)
    assert not torch.allclose(logits(attached("prefix")[0], batch), base, atol=1e-3)


def test_blocks_injection_moves_only_the_positions_being_denoised(tiny):
    """A block's perturbation lands where logits are read; the prompt's states stay as the block made them."""
    batch = tiny_batch(tiny, padded=True)
    model, method = attached("lora_diffusion", injection="blocks", blocks_positions="denoised")
    perturb(method)
    positions = batch["response_mask"]
    n = positions.shape[0]
    model.step_context = StepContext(torch.full((n,), 0.9), batch["instruction"], positions)
    h = torch.randn(*positions.shape, model.backbone.hidden_size)
    with torch.no_grad():
        out = method._block_hook(0)(None, None, (h,))[0]
    assert torch.equal(out[~positions], h[~positions])
    assert (out[positions] - h[positions]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("name,options,merged", [(n, o, False) for n, o in VARIANTS]
                         + [(n, {}, True) for n in ALL if METHODS[n].can_merge])
def test_detach_gives_back_exactly_the_base(name, options, merged, tiny):
    """Trained (here: perturbed), maybe merged, then detached: the base's logits, bit for bit."""
    batch = tiny_batch(tiny, padded=True)
    base_model = DiffusionLM(tiny_backbone(seed=0))
    before = logits(base_model, batch)
    names = {n for n, _ in base_model.named_parameters()}
    model, method = DiffusionLM(tiny_backbone(seed=0)), make_method(name, options)
    method.keep_base = True  # full fine-tuning keeps a copy of the base only when asked
    method.attach(model)
    perturb(method)  # for full fine-tuning and BitFit this changes the base's own weights
    if merged:
        method.merge()
    assert not torch.equal(logits(model, batch), before)
    method.detach()
    assert torch.equal(logits(model, batch), before)
    assert {n for n, _ in model.named_parameters()} == names  # nothing of the method is left behind
    assert all(p.requires_grad for p in model.parameters())  # as the fresh base had them
    assert not model.step_hooks and not model.grad_through_body


def test_full_fine_tuning_without_a_copy_of_the_base_refuses_to_detach():
    model, method = attached("full")
    assert method.snapshot is None  # no second copy of the model unless asked
    with pytest.raises(UserError, match="kept no copy"):
        method.detach()


@pytest.mark.parametrize("name,options", VARIANTS)
def test_every_method_trains_only_its_own_parameters(name, options, tiny):
    model, method = attached(name, **options)
    perturb(method)  # past the zero init, so every trainable tensor gets a gradient
    batch = tiny_batch(tiny, padded=True)
    model.train()
    t = torch.tensor([0.9, 0.5, 0.1, 0.8])  # every phase of lora_diffusion
    loss = diffusion_loss(model, **batch, t=t, generator=torch.Generator().manual_seed(0))
    penalty = method.regularization()
    (loss if penalty is None else loss + penalty).backward()
    trainable = set(map(id, method.trainable_parameters().values()))
    for p in model.parameters():
        if id(p) in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None and not p.requires_grad


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_and_unmerge_keep_the_logits(name, tiny):
    """Merged weights give the unmerged logits (fp32, atol 1e-4); unmerging restores the base weights."""
    model, method = attached(name)
    perturb(method)
    batch = tiny_batch(tiny, padded=True)
    unmerged = logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.backbone.mlm.named_parameters() if "lora" not in n}
    method.merge()
    assert torch.allclose(logits(model, batch), unmerged, atol=1e-4)
    method.unmerge()
    assert torch.allclose(logits(model, batch), unmerged, atol=1e-4)
    for n, p in model.backbone.mlm.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-5), n


def test_weight_lora_adapter_loads_with_peft(tmp_path, tiny):
    from peft import PeftModel

    model, method = attached("lora", r=4, targets="attention+mlp")
    perturb(method)
    batch = tiny_batch(tiny, padded=True)
    expected = logits(model, batch)
    save(tmp_path, model, method)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    fresh = tiny_backbone(seed=0)
    PeftModel.from_pretrained(fresh.mlm, tmp_path / "peft")
    assert torch.allclose(logits(DiffusionLM(fresh), batch), expected, atol=1e-5)


@pytest.mark.parametrize("name,options", VARIANTS)
def test_saved_adapter_reloads_to_the_same_logits(name, options, tmp_path, tiny):
    model, method = attached(name, **options)
    perturb(method)
    batch = tiny_batch(tiny, padded=True)
    expected = logits(model, batch)
    save(tmp_path, model, method)
    loaded, loaded_method, config = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    assert config["method"] == name and loaded_method.config == method.config
    assert torch.allclose(logits(loaded, batch), expected, atol=1e-4)


def test_a_mismatched_adapter_is_refused(tmp_path):
    model, method = attached("lora", r=4)
    save(tmp_path, model, method)
    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(tmp_path, base=tiny_backbone(seed=1))  # another base
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["options"]["r"] = 8  # the file's tensors no longer fit the method
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has shape"):
        load_adapter(tmp_path, base=tiny_backbone(seed=0))
    with pytest.raises(UserError, match="unknown method"):
        make_method("magic")
    with pytest.raises(UserError, match="has no option 'rank'; its options: r, alpha"):
        make_method("lora", {"rank": 4})


def test_phases_and_step_scales():
    t = torch.tensor([1.0, 0.9, 2 / 3, 0.5, 1 / 3, 0.1])
    assert phase_of(t).tolist() == [0, 0, 1, 1, 2, 2]
    model, method = attached("lora_diffusion")
    perturb(method)
    h = torch.randn(2, 5, model.backbone.hidden_size)
    early = method.perturbation(0, h, torch.full((2,), 0.9), None)
    with torch.no_grad():  # changing the late phase leaves an early step alone
        for g in method.trajectory.sites[0].phases[2]:
            g.up.weight.mul_(3.0)
    assert torch.allclose(method.perturbation(0, h, torch.full((2,), 0.9), None), early)
    # a batch that mixes phases gives each row what it would get alone
    mixed = method.perturbation(0, h, torch.tensor([0.9, 0.1]), None)
    assert torch.allclose(mixed[0], early[0], atol=1e-6)
    assert torch.allclose(mixed[1], method.perturbation(0, h, torch.full((2,), 0.1), None)[1], atol=1e-6)


def test_instruction_conditioning_keeps_rank_at_most_r(tiny):
    """For any instruction c, the map z -> A(c) z has rank <= r: the gate never raises the rank."""
    model, method = attached("lora_diffusion", ranks=[3, 3, 3], k=1)
    perturb(method)
    g = method.trajectory.sites[0].phases[0][0]
    for seed in range(3):
        instruction = torch.randint(1000, 5000, (1, 6), generator=torch.Generator().manual_seed(seed))
        c = method.instruction_encoding(instruction)
        a_of_c = g.up.weight * (1 + g.gate(c))[0]  # W_A diag(1 + gamma(c)): [d, r]
        assert torch.linalg.matrix_rank(a_of_c.detach()) <= 3


def test_regularisers_are_finite_at_init_and_measure_what_they_say():
    model, method = attached("lora_diffusion", lambda_rank=0.0, lambda_orth=1.0, k=2, ranks=[2, 2, 2])
    assert float(method.regularization().detach()) == 0.0  # W_A = 0: orthogonal trivially
    g1, g2 = method.trajectory.sites[0].phases[0]
    with torch.no_grad():
        g1.up.weight.zero_()
        g2.up.weight.zero_()
        g1.up.weight[0, 0] = 1.0
        g2.up.weight[1, 0] = 1.0  # orthogonal columns: still no penalty
    assert float(method.regularization().detach()) == 0.0
    with torch.no_grad():
        g2.up.weight[0, 1] = 2.0  # now W_A1^T W_A2 has one entry 2: ||.||_F^2 = 4, twice (i, j) and (j, i)
    assert float(method.regularization().detach()) == pytest.approx(8.0)

    model, method = attached("lora_diffusion", lambda_rank=1.0, lambda_orth=0.0, rank_penalty="loss")
    penalty = method.regularization()
    penalty.backward()  # the nuclear norm at W_A = 0 has a finite (sub)gradient
    for p in method.trainable_parameters().values():
        assert p.grad is None or torch.isfinite(p.grad).all()
    expected = sum(torch.linalg.matrix_norm(g.down.weight, ord="nuc").item()
                   for _, _, mods in method.modules_by_phase() for g in mods)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-4)
    assert method.nuclear_norms() == pytest.approx(expected, rel=1e-4)  # W_A = 0 adds nothing


def test_proximal_rank_step_soft_thresholds_the_singular_values():
    model, method = attached("lora_diffusion", lambda_rank=0.5, lambda_orth=0.0)  # rank_penalty="proximal"
    assert method.regularization() is None  # the rank term is not in the loss
    perturb(method)
    g = method.trajectory.sites[0].phases[1][0]
    before = torch.linalg.svdvals(g.down.weight.detach()).clone()
    method.after_step(lr=0.01)  # threshold 0.005
    after = torch.linalg.svdvals(g.down.weight.detach())
    assert torch.allclose(after, (before - 0.005).clamp(min=0), atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 40), (40, 8), (5, 5)])
def test_the_proximal_step_equals_soft_thresholding_through_an_svd(shape):
    # after_step shrinks through the small Gram matrix's eigendecomposition; the
    # definition is through the SVD: U diag(max(s - tau, 0)) V^T, the whole matrix.
    g = torch.Generator().manual_seed(0)
    w = torch.randn((3,) + shape, generator=g) * torch.linspace(0.01, 1, shape[-1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    tau = float(s.median())
    expected = (u * (s - tau).clamp(min=0).unsqueeze(-2)) @ vh
    assert torch.allclose(_shrink_singular_values(w, tau), expected, atol=1e-5)
    assert torch.equal(_shrink_singular_values(torch.zeros(shape), 0.1), torch.zeros(shape))


@pytest.mark.parametrize("injection", ["final", "blocks", "weights"])
def test_an_adapter_over_the_size_cap_is_refused_before_the_model_changes(injection, monkeypatch):
    monkeypatch.setattr(lora_diffusion_module, "MAX_TRAINABLE", 1000)  # the tiny base's adapters are all bigger
    model = DiffusionLM(tiny_backbone(seed=0))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    method = make_method("lora_diffusion", {"injection": injection})
    with pytest.raises(UserError, match="over the cap"):
        method.attach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "trajectory")


def test_calibration_standardises_h_at_the_read_positions_and_is_saved(tmp_path, tiny):
    model, method = attached("lora_diffusion", injection="final")
    batch = tiny_batch(tiny, padded=True)
    logits(model, batch)  # the first call calibrates on h at the response positions
    site = method.trajectory.sites[0]
    with torch.no_grad():
        h = model.backbone.hidden_states(batch["input_ids"], batch["attention_mask"])[batch["response_mask"]]
    assert bool(site.calibrated)
    assert torch.allclose(site.h_mean, h.mean(0), atol=1e-5) and torch.allclose(site.h_std, h.std(0), atol=1e-5)
    save(tmp_path, model, method)
    loaded, loaded_method, _ = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    assert torch.equal(loaded_method.trajectory.sites[0].h_mean, site.h_mean)
    assert bool(loaded_method.trajectory.sites[0].calibrated)
    raw = attached("lora_diffusion", calibrate=False)[1]
    assert raw.buffers() == {} and not any("h_mean" in k for k in raw.state_dict())


@pytest.mark.parametrize("stored,expected", [
    # as f92f9f9 wrote them: every option, blocks_positions at its default of the time
    ({"injection": "final", "blocks_positions": "denoised"}, {"injection": "final"}),
    ({"injection": "weights", "targets": "attention", "blocks_positions": "denoised"},
     {"injection": "weights", "targets": "attention"}),
    # older still: no injection option at all (final), or blocks without blocks_positions
    ({}, {"injection": "final"}),
    ({"injection": "blocks"}, {"injection": "blocks", "blocks_positions": "denoised"})])
def test_an_adapter_saved_under_earlier_defaults_loads_as_it_was_trained(tmp_path, stored, expected):
    model, method = attached("lora_diffusion", ranks=(4, 2, 1), **expected)
    save(tmp_path, model, method)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["options"] = {k: v for k, v in config["options"].items() if k not in ("injection", "blocks_positions")}
    config["options"].update(stored)
    config_file.write_text(json.dumps(config))
    _, loaded, _ = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    assert {k: getattr(loaded.config, k) for k in expected} == expected


def test_final_injection_trains_without_a_graph_through_the_base(tiny):
    model, method = attached("lora_diffusion", injection="final")
    seen = {}

    def spy(h, context):
        seen["h_requires_grad"] = h.requires_grad
        return torch.zeros_like(h)

    model.add_step_hook(spy)  # beside the method's own
    model.train()
    batch = tiny_batch(tiny, padded=True)
    diffusion_loss(model, **batch, generator=torch.Generator().manual_seed(0)).backward()
    assert seen["h_requires_grad"] is False
    blocks_model, _ = attached("lora_diffusion", injection="blocks")
    assert blocks_model._body_needs_grad()  # blocks injection needs the backward pass


def test_one_module_per_phase_has_no_orthogonality_term():
    """k = 1 leaves no pair to keep orthogonal; the loop must get None, not a bare 0.0 (it crashed)."""
    _, method = attached("lora_diffusion", k=1)
    assert method.regularization() is None
    _, method = attached("lora_diffusion", k=2)
    assert torch.is_tensor(method.regularization())


def test_prefix_variants_and_their_checks():
    assert make_method("prefix").default_lr == 5e-3
    assert make_method("prefix", {"reparam": False}).default_lr == 1e-2  # free prefixes: P-tuning v2's range
    with pytest.raises(UserError, match="reparam"):
        make_method("prefix", {"reparam": "no"})
    with pytest.raises(UserError, match="init"):
        make_method("prefix", {"init": "zeros"})
    # The words start with free prefixes puts them exactly at the base's keys/values of real words.
    _, method = attached("prefix", reparam=False)
    assert torch.count_nonzero(method.encoder.delta) == 0
    assert torch.equal(method.encoder(), method.encoder.start) and method.encoder.start.abs().sum() > 0
    _, random_start = attached("prefix", reparam=False, init="random")
    assert random_start.encoder.start.abs().sum() == 0 and random_start.encoder.delta.std() > 0.5
