"""LoRA-Diffusion's `weights` injection (phase modules as low-rank updates of the projections)
and `blocks_positions="all"`, on the tiny random base."""

import json

import pytest
import torch

from conftest import logits, perturb, tiny_batch
from lora_diffusion.adapters import load_adapter, save_adapter
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.cli import main
from lora_diffusion.data import load_task
from lora_diffusion.diffusion import PHASES, DiffusionLM, StepContext, diffusion_loss, sample
from lora_diffusion.errors import UserError
from lora_diffusion.methods import make_method
from lora_diffusion.router import Composition
from lora_diffusion.training import TrainConfig, train

TIMES = {"early": 0.9, "middle": 0.5, "late": 0.1}
MIXED = torch.tensor([0.9, 0.5, 0.1, 0.8])  # rows in every phase, as a training batch has them


def attached(**options):
    model = DiffusionLM(tiny_backbone(seed=0))
    method = make_method("lora_diffusion", {"injection": "weights", **options})
    method.attach(model)
    return model, method


def one_instruction(batch):
    """The batch with every row under the first row's instruction (as when sampling one task)."""
    return {**batch, "instruction": batch["instruction"][:1].expand_as(batch["instruction"])}


def projection_weights(model):
    return {n: p.detach().clone() for n, p in model.backbone.body.named_parameters() if n.endswith("weight")}


def test_starts_equal_to_the_base_and_builds_only_what_it_uses(tiny):
    batch = tiny_batch(tiny, padded=True)
    model, method = attached()
    assert torch.equal(logits(model, batch, MIXED), logits(DiffusionLM(tiny_backbone(seed=0)), batch, MIXED))
    names = method.trainable_parameters()
    assert not any(".time." in n for n in names)  # no time embedding for this site
    assert method.buffers() == {}  # and no calibration (`calibrate` is ignored)
    assert len(method.trajectory.sites) == 2 * 6  # q, k, v, o, ffn_in, ffn_out of 2 blocks
    assert len(attached(targets="attention")[1].trajectory.sites) == 2 * 4
    assert model._body_needs_grad()


def test_trains_only_its_own_parameters(tiny):
    model, method = attached()
    perturb(method)
    model.train()
    loss = diffusion_loss(model, **tiny_batch(tiny, padded=True), t=MIXED, generator=torch.Generator().manual_seed(0))
    (loss + method.regularization()).backward()
    trainable = set(map(id, method.trainable_parameters().values()))
    for p in model.parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None and not p.requires_grad


def test_accounting_equals_the_formula_and_the_saved_file(tmp_path):
    model, method = attached()
    acc = method.accounting()
    d, d_c, k = 32, 32, 2  # the tiny base: width 32, MLP 128
    shapes = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]  # q, k, v, o, ffn_in, ffn_out
    expected = 2 * sum(k * (d_in * r + r * d_out + d_c * r + r) for r in (64, 32, 8) for d_in, d_out in shapes)
    assert acc["trainable_parameters"] == method.n_trainable() == acc["formula_total"] == expected
    assert acc["terms"]["sites"] == 12 and acc["terms"]["projections"] == {"32x32": 8, "32x128": 2, "128x32": 2}
    assert acc["adapter_parameters"] == expected  # no buffers
    task = load_task("suite_topic", max_train=8, max_eval=4)
    save_adapter(tmp_path, method, model.backbone, tiny_backbone(seed=0).fingerprint(), task, 2, 128)
    path = tmp_path / "adapter.safetensors"
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert path.stat().st_size - header == acc["adapter_bytes"] == 4 * expected
    assert json.loads((tmp_path / "adapter_config.json").read_text())["accounting"]["formula_total"] == expected


def test_a_saved_adapter_reloads_to_identical_logits(tmp_path, tiny):
    model, method = attached(targets="attention", ranks=[4, 2, 1])
    perturb(method)
    batch = tiny_batch(tiny, padded=True)
    task = load_task("suite_topic", max_train=8, max_eval=4)
    save_adapter(tmp_path, method, model.backbone, tiny_backbone(seed=0).fingerprint(), task, 2, 128)
    loaded, loaded_method, config = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    assert config["options"]["injection"] == "weights" and loaded_method.config == method.config
    assert not loaded_method.merged  # one merge cannot serve every phase
    assert torch.equal(logits(loaded, batch, MIXED), logits(model, batch, MIXED))


@pytest.mark.parametrize("merged", [False, True])
def test_detach_gives_back_exactly_the_base(merged, tiny):
    batch = tiny_batch(tiny, padded=True)
    base = DiffusionLM(tiny_backbone(seed=0))
    before, names = logits(base, one_instruction(batch), 0.1), {n for n, _ in base.named_parameters()}
    model, method = attached()
    perturb(method)
    if merged:
        method.merge("late", batch["instruction"][0])
    assert not torch.equal(logits(model, one_instruction(batch), 0.1), before)
    method.detach()
    assert torch.equal(logits(model, one_instruction(batch), 0.1), before)
    assert {n for n, _ in model.named_parameters()} == names
    assert all(p.requires_grad for p in model.parameters()) and not model.grad_through_body


def test_the_phase_of_the_step_chooses_the_modules(tiny):
    """Changing one phase's updates changes the steps in that phase, and only those."""
    batch = tiny_batch(tiny, padded=True)
    model, method = attached()
    perturb(method)
    before = {phase: logits(model, batch, t) for phase, t in TIMES.items()}
    mixed = logits(model, batch, MIXED)
    rows = batch["response_mask"].sum(1).tolist()  # logits come flattened, row after row
    for row, (part, phase) in enumerate(zip(mixed.split(rows), ["early", "middle", "late", "early"])):
        assert torch.allclose(part, before[phase].split(rows)[row], atol=1e-5)  # each row as if alone
    for p, changed in enumerate(PHASES):
        with torch.no_grad():
            for site in method.trajectory.sites:
                for g in site.phases[p]:
                    g.up.weight.mul_(3.0)
        for phase, t in TIMES.items():
            assert torch.equal(logits(model, batch, t), before[phase]) == (phase != changed), (changed, phase)
            before[phase] = logits(model, batch, t)


@pytest.mark.parametrize("phase", PHASES)
def test_merged_per_phase_gives_the_unmerged_outputs_and_unmerges_exactly(phase, tiny):
    batch = one_instruction(tiny_batch(tiny, padded=True))
    model, method = attached()
    perturb(method)
    unmerged, weights = logits(model, batch, TIMES[phase]), projection_weights(model)
    with method.merged_for(phase, batch["instruction"][0]):
        assert method.merged
        merged = logits(model, batch, TIMES[phase])
        assert not torch.equal(projection_weights(model)["encoder.layer.0.attention.self.query.weight"],
                               weights["encoder.layer.0.attention.self.query.weight"])
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert not method.merged
    assert all(torch.equal(p, weights[n]) for n, p in projection_weights(model).items())
    assert torch.equal(logits(model, batch, TIMES[phase]), unmerged)


def test_a_merged_model_refuses_a_step_it_was_not_merged_for(tiny):
    batch = one_instruction(tiny_batch(tiny, padded=True))
    model, method = attached()
    perturb(method)
    with method.merged_for("early", batch["instruction"][0]):
        with pytest.raises(UserError, match="merged for the early phase"):
            logits(model, batch, 0.1)
        with pytest.raises(UserError, match="another instruction"):
            logits(model, tiny_batch(tiny, padded=True), 0.9)  # each row has its own instruction
    with pytest.raises(UserError, match="these rows differ"):
        method.merge("early", tiny_batch(tiny)["instruction"])
    _, unconditioned = attached(condition=False)  # the instruction is unused, so rows may differ
    with unconditioned.merged_for("early", tiny_batch(tiny)["instruction"]):
        pass
    with pytest.raises(UserError, match="not 'noon'"):
        method.merge("noon")
    with pytest.raises(UserError, match="one update per phase"):
        method.merge()  # what the evaluation would call if can_merge were true
    assert not method.can_merge
    _, final = attached(injection="final")
    with pytest.raises(UserError, match="cannot be merged"):
        final.merge("early")


def test_sampling_with_merged_weights_gives_the_same_tokens(tiny):
    """One sampler step at t = 1 is all in the early phase: merged and unmerged decode alike."""
    batch = one_instruction(tiny_batch(tiny, padded=True))
    model, method = attached()
    perturb(method, seed=2)
    unmerged, _ = sample(model, **batch, steps=1)
    with method.merged_for("early", batch["instruction"][0]):
        merged, _ = sample(model, **batch, steps=1)
    assert torch.equal(merged, unmerged)


def test_conditioning_never_raises_the_rank_of_an_update(tiny):
    """For any instruction, dW_p(c) (merged into W) has rank <= k r_p."""
    k, ranks = 2, (3, 2, 1)
    model, method = attached(k=k, ranks=list(ranks))
    perturb(method)
    name = "encoder.layer.1.intermediate.dense.weight"  # a 128 x 32 projection
    base = projection_weights(model)[name].double()
    for seed in range(3):
        instruction = torch.randint(1000, 5000, (6,), generator=torch.Generator().manual_seed(seed))
        for p, r in enumerate(ranks):
            with method.merged_for(p, instruction):
                delta = projection_weights(model)[name].double() - base
            assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4) <= k * r


def test_a_short_training_run_lowers_the_loss(tiny):
    """30 steps on 8 examples, the loss measured on fixed noise before and after.

    A frozen random base reads logits through its random tied embeddings (norm ~0.1), so no
    change of h takes the loss far below log(vocab) = 10.3: at lr 2e-3 weight LoRA gains
    0.04 in these 30 steps, `final` 0.09 and `weights` 0.08 (0.015 at 5e-4, the
    default of its default ranks on the shipped base).
    """
    model, method = attached()
    batch = tiny_batch(tiny, n=8, padded=True)

    def held_loss():
        with torch.no_grad():
            return float(diffusion_loss(model, **batch, t=torch.linspace(0.05, 0.95, 8),
                                        generator=torch.Generator().manual_seed(5)))

    before = held_loss()
    summary = train(model, method, lambda step, micro: batch,
                    TrainConfig(steps=30, batch_size=8, lr=2e-3, seed=0, checkpoint_every=0, log_every=5),
                    progress=False)
    assert held_loss() < before - 0.05
    assert summary["final_train_loss"] < before


@pytest.mark.parametrize("injection", ["weights", "blocks"])
def test_the_body_alone_is_refused_a_step_it_cannot_place(tiny, injection):
    model, _ = attached(injection=injection)
    with pytest.raises(UserError, match="through DiffusionLM"):
        model.backbone.hidden_states(tiny_batch(tiny)["input_ids"], tiny_batch(tiny)["attention_mask"])


def test_the_router_refuses_weights_adapters(tiny):
    model, method = attached()
    with pytest.raises(UserError, match="injection=final or blocks"):
        Composition(model, [method], ["suite_topic"])


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_options_are_in_the_help_and_checked(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    assert "'final' or 'blocks' or 'weights'" in out
    assert "targets" in out and "blocks_positions" in out
    # weights: one small rate at any size (measured on SST-2 at both sizes)
    assert make_method("lora_diffusion", {"injection": "weights", "k": 1, "ranks": [6, 3, 1]}).default_lr == 6e-4
    assert make_method("lora_diffusion", {"injection": "weights"}).default_lr == 6e-4
    base = ["train", "--task", "suite_topic", "--steps", "1", "--out", tmp_path / "run", "--method", "lora_diffusion"]
    for options, message in [
            (["injection=weights", "targets=bogus"], "'targets' must be 'attention' or 'attention+mlp'"),
            (["targets=attention"], "'targets' applies to injection=weights"),
            (["injection=final", "blocks_positions=denoised"], "'blocks_positions' applies to injection=blocks"),
            (["injection=weights", "time_dim=32"], "injection=weights has no time embedding"),
            (["phases=shared", "scales=1,1,1"], "one shared module set has scale 1")]:
        code, _, err = run_cli(capsys, *base, *[a for o in options for a in ("--option", o)])
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


# --- blocks_positions="all": the context positions move too, with their own statistics ---------

def test_blocks_on_all_positions_calibrates_the_context_apart_and_saves_it(tmp_path, tiny):
    batch = tiny_batch(tiny, padded=True)
    model = DiffusionLM(tiny_backbone(seed=0))
    method = make_method("lora_diffusion", {"injection": "blocks", "blocks_positions": "all"})
    method.attach(model)
    h = {}  # the first block's output, as the first site calibrates on it
    spy = model.backbone.blocks()[0].register_forward_hook(
        lambda m, a, out: h.setdefault("h", out[0] if isinstance(out, tuple) else out))
    base = logits(DiffusionLM(tiny_backbone(seed=0)), batch, MIXED)
    assert torch.allclose(logits(model, batch, MIXED), base, atol=1e-5)  # up = 0: starts at the base
    spy.remove()
    site, read = method.trajectory.sites[0], batch["response_mask"]
    assert torch.allclose(site.h_mean, h["h"][read].mean(0), atol=1e-5)
    real = batch["attention_mask"].bool()
    assert not bool(real.all())  # the batch has padding, which the context statistics leave out
    assert torch.allclose(site.context_mean, h["h"][~read & real].mean(0), atol=1e-5)
    assert torch.allclose(site.context_std, h["h"][~read & real].std(0), atol=1e-5)
    assert "trajectory.sites.1.context_std" in method.buffers()
    perturb(method)
    expected = logits(model, batch, MIXED)
    task = load_task("suite_topic", max_train=8, max_eval=4)
    save_adapter(tmp_path, method, model.backbone, tiny_backbone(seed=0).fingerprint(), task, 2, 128)
    loaded, _, _ = load_adapter(tmp_path, base=tiny_backbone(seed=0))
    assert torch.equal(logits(loaded, batch, MIXED), expected)


def test_blocks_on_all_positions_moves_the_prompt_too(tiny):
    batch = tiny_batch(tiny, padded=True)
    outputs = {}
    for where in ("denoised", "all"):
        model = DiffusionLM(tiny_backbone(seed=0))
        method = make_method("lora_diffusion", {"injection": "blocks", "blocks_positions": where, "calibrate": False})
        torch.manual_seed(0)  # the same modules for both
        method.attach(model)
        perturb(method)
        model.step_context = StepContext(torch.full((4,), 0.9), batch["instruction"], batch["response_mask"],
                                         batch["attention_mask"])
        h = torch.randn(4, batch["input_ids"].shape[1], 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs[where] = method._block_hook(0)(None, None, (h,))[0] - h
    prompt = ~batch["response_mask"]
    assert torch.equal(outputs["denoised"][prompt], torch.zeros_like(outputs["denoised"][prompt]))
    assert outputs["all"][prompt].abs().amax(-1).min() > 0
    assert torch.equal(outputs["all"][~prompt], outputs["denoised"][~prompt])


@pytest.mark.parametrize("injection", ["final", "weights"])
def test_one_shared_module_set_has_the_phases_parameters_and_one_set(injection, tiny):
    # The ablation "does the phase matter?": one set of rank sum(ranks) acts at every step.
    counts = {}
    for phases in ("separate", "shared"):
        method = make_method("lora_diffusion", {"injection": injection, "phases": phases, "ranks": [4, 2, 1]})
        method.attach(DiffusionLM(tiny_backbone(seed=0)))
        acc = method.accounting()
        counts[phases] = acc["trainable_parameters"]
        assert acc["formula_total"] == acc["trainable_parameters"]
        sets = {name for _, name, _ in method.modules_by_phase()}
        assert sets == (set(PHASES) if phases == "separate" else {"all"})
    assert counts["separate"] == counts["shared"]


def test_a_shared_weights_update_is_the_same_at_every_step(tiny):
    batch = one_instruction(tiny_batch(tiny, padded=True))
    model, method = attached(phases="shared", ranks=[2, 1, 1])
    perturb(method)
    early, late = logits(model, batch, 0.9), logits(model, batch, 0.1)
    assert torch.equal(early, late) and not torch.equal(early, logits(DiffusionLM(tiny_backbone(seed=0)), batch, 0.9))
    with method.merged_for("early", batch["instruction"]):
        merged_late = logits(model, batch, 0.1)  # one merge serves every phase
    assert torch.allclose(merged_late, late, atol=1e-5)
