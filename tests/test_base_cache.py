"""The frozen base computed once (base_cache.py, `train --cache-base`): the cached states are the
body's, a cached run trains the adapter the uncached one trains, inputs that repeat are served
from the cache, and a method that acts inside the base is refused."""

import json

import pytest
import torch
from conftest import logits, perturb, tiny_batch

from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.base_cache import BaseStateCache
from lora_diffusion.data import batch_schedule, collate, encode, load_task
from lora_diffusion.diffusion import DiffusionLM
from lora_diffusion.errors import UserError
from lora_diffusion.methods import make_method
from lora_diffusion.training import TrainConfig, train

FINAL = {"injection": "final", "ranks": [4, 2, 1]}


def test_cached_states_give_the_logits_the_body_gives_however_the_batch_is_padded():
    model = DiffusionLM(tiny_backbone(seed=0))
    method = make_method("lora_diffusion", FINAL)
    method.attach(model)
    perturb(method)
    batch = tiny_batch(model.backbone, n=4, padded=True)
    model.eval()
    want = logits(model, batch)
    model.train()  # the cache serves training steps only
    model.base_cache = cache = BaseStateCache()
    first = logits(model, batch)
    assert (cache.hits, cache.misses, len(cache.states)) == (0, 4, 4)
    again = logits(model, batch)
    assert (cache.hits, cache.misses) == (4, 4)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-4)
    # the same rows padded to a longer batch are the same inputs: served from the cache
    longer = {k: torch.cat([v, torch.full((4, 3), 0, dtype=v.dtype)], 1) if v.ndim == 2 and k != "instruction"
              else v for k, v in batch.items()}
    torch.testing.assert_close(logits(model, longer), want, atol=1e-5, rtol=1e-4)
    assert cache.hits == 8
    model.eval()  # out of training, the body runs (a sampler's states are not kept)
    logits(model, batch)
    assert cache.hits == 8 and cache.misses == 4


def _run(cache: bool, steps: int = 12, bf16: bool = False):
    backbone = tiny_backbone(seed=0)  # no dropout: with and without the cache are the same run
    task = load_task("suite_sentiment", max_train=6)  # one-word answers, 6 examples: inputs repeat
    enc = encode(backbone.tokenizer, task.train, 2, 96)
    order = batch_schedule(len(enc.prompts), 4, seed=0)
    model = DiffusionLM(backbone)
    torch.manual_seed(0)
    method = make_method("lora_diffusion", FINAL)
    method.attach(model)
    config = TrainConfig(steps=steps, batch_size=4, lr=3e-3, log_every=1, cache_base=cache, bf16=bf16)
    summary = train(model, method, lambda step, micro: collate(enc, order(step), backbone.pad_id), config,
                    progress=False)
    return method.state_dict(), summary


def test_a_cached_run_trains_the_adapter_an_uncached_run_trains_and_reuses_repeated_inputs():
    plain, plain_summary = _run(cache=False)
    cached, summary = _run(cache=True)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4)
    assert any(float(plain[name].abs().max()) > 0 for name in plain if name.endswith("up.weight"))  # it trained
    stats = summary["base_cache"]
    # 6 examples, each with a 2-token answer masked in at most 3 ways: at most 18 distinct inputs
    assert stats["misses"] <= 18 and stats["hits"] == 12 * 4 - stats["misses"] and stats["hits"] > 0
    assert 0 < stats["inputs_kept"] <= stats["misses"]  # (an input twice in one batch misses twice)
    assert "base_cache" not in plain_summary


def test_under_bf16_autocast_a_cached_run_trains_what_an_uncached_one_trains():
    plain, _ = _run(cache=False, steps=6, bf16=True)
    cached, summary = _run(cache=True, steps=6, bf16=True)
    assert summary["base_cache"]["hits"] > 0  # batches mixing kept and new states were served
    for name in plain:  # (bf16 itself moves these adapters by ~3e-3 from fp32's after 6 steps)
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, options", [("lora_diffusion", {"injection": "blocks", "ranks": [2, 1, 1]}),
                                           ("lora", {"r": 2})])
def test_a_method_acting_inside_the_base_is_refused_the_cache(name, options):
    backbone = tiny_backbone(seed=0)
    model = DiffusionLM(backbone)
    method = make_method(name, options)
    method.attach(model)
    with pytest.raises(UserError, match="--cache-base needs a method that reads only the base's last hidden"):
        train(model, method, lambda step, micro: {}, TrainConfig(steps=1, cache_base=True), progress=False)


def test_the_cache_settings_that_cannot_work_are_refused():
    with pytest.raises(UserError, match="--cache-base and --compile do not go together"):
        TrainConfig(cache_base=True, compile=True)
    with pytest.raises(UserError, match="--cache-base-mb sizes the cache of --cache-base"):
        TrainConfig(cache_base_mb=10)
    with pytest.raises(UserError, match="--cache-base-mb must be a finite number of MB >= 0"):
        TrainConfig(cache_base=True, cache_base_mb=-1)


def test_with_dropout_the_cache_keeps_the_bases_own_states_and_leaves_training_mode_on():
    backbone = tiny_backbone(seed=0)
    backbone.mlm.config.hidden_dropout_prob = 0.5
    for module in backbone.mlm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model = DiffusionLM(backbone)
    method = make_method("lora_diffusion", FINAL)
    method.attach(model)
    batch = tiny_batch(backbone, n=3)
    model.eval()
    want = logits(model, batch)  # no dropout
    model.train()
    assert not torch.allclose(logits(model, batch), want, atol=1e-3)  # dropout is on: the body's draws differ
    model.base_cache = BaseStateCache()
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=1e-4)
    assert backbone.mlm.training  # the cache ran the body in eval mode and put training mode back


def test_a_full_cache_stops_keeping_states_and_the_body_serves_the_rest():
    model = DiffusionLM(tiny_backbone(seed=0))
    method = make_method("lora_diffusion", FINAL)
    method.attach(model)
    batch = tiny_batch(model.backbone, n=4)
    model.eval()
    want = logits(model, batch)
    model.train()
    model.base_cache = cache = BaseStateCache(max_mb=0)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=1e-4)
    assert len(cache.states) == 0 and cache.misses == 8


def test_train_cli_with_cache_base_reports_what_the_cache_did(capsys, tmp_path, tiny_base_dir):
    from test_cli import run_cli

    args = ["train", "--base", str(tiny_base_dir), "--task", "suite_sentiment", "--max-train-examples", "8",
            "--max-eval-examples", "4", "--steps", "6", "--batch-size", "4", "--sampler-steps", "2",
            "--method", "lora_diffusion", "--option", "injection=final", "--option", "ranks=4,2,1"]
    code, _, err = run_cli(capsys, *args, "--cache-base", "--out", str(tmp_path / "cached"))
    assert code == 0, err
    result = json.loads((tmp_path / "cached" / "results.json").read_text())
    assert result["config"]["cache_base"] is True
    assert result["train"]["base_cache"]["hits"] + result["train"]["base_cache"]["misses"] == 6 * 4
    code, _, err = run_cli(capsys, *args[:-2], "--option", "injection=blocks", "--cache-base")
    assert code != 0 and "--cache-base needs a method that reads only" in err


def test_compares_cache_preset_trains_its_row_with_the_cache_and_refuses_a_run_without_it(capsys, tmp_path,
                                                                                           tiny_base_dir):
    from test_cli import run_cli

    args = ["compare", "--base", str(tiny_base_dir), "--task", "suite_sentiment", "--preset", "cache", "--seed", "0",
            "--steps", "4", "--batch-size", "4", "--max-train-examples", "8", "--max-eval-examples", "4",
            "--sampler-steps", "2", "--out", str(tmp_path / "cmp")]
    code, _, err = run_cli(capsys, *args, "--rows", "lora_diffusion cached")
    assert code == 0, err
    row = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"][0]
    assert row["train_settings"] == {"cache_base": True} and "profile" not in row  # a profile would time no cache
    run = json.loads((tmp_path / "cmp" / "lora_diffusion_cached" / "seed-0" / "results.json").read_text())
    assert run["config"]["cache_base"] is True and run["train"]["base_cache"]["misses"] > 0
    # the folder of the cached row holds a cached run: the same label without the cache is refused
    results = tmp_path / "cmp" / "lora_diffusion_cached" / "seed-0" / "results.json"
    run["config"]["cache_base"] = False
    results.write_text(json.dumps(run))
    code, _, err = run_cli(capsys, *args, "--rows", "lora_diffusion cached")
    assert code != 0 and "holds a run with cache_base=False, not True" in err
