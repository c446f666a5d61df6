"""Many adapters in one batch (lora_diffusion/mixed.py): every row decoded with its own
adapter gives what that adapter alone gives, for LoRA-Diffusion (both sites) and weight LoRA."""

import pytest
import torch
from conftest import logits, perturb, tiny_batch
from test_methods import save

from lora_diffusion.adapters import load_adapter
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.diffusion import DiffusionLM
from lora_diffusion.errors import UserError
from lora_diffusion.methods import make_method
from lora_diffusion.mixed import MixedAdapters

KINDS = [("lora_diffusion", {"injection": "final", "ranks": [4, 2, 1]}),
         ("lora_diffusion", {"injection": "blocks", "ranks": [4, 2, 1]}),
         ("lora", {"r": 4}), ("lora", {"r": 2, "targets": "attention+mlp"})]


def saved(tmp_path, i, name, options):
    model = DiffusionLM(tiny_backbone(seed=0))
    method = make_method(name, options)
    method.attach(model)
    perturb(method, seed=i + 1)  # every adapter different, none zero
    logits(model, tiny_batch(model.backbone, seed=9))  # a trained adapter is calibrated (first batch)
    save(tmp_path / f"adapter{i}", model, method)
    return tmp_path / f"adapter{i}"


def test_each_row_of_a_mixed_batch_gets_its_own_adapters_logits(tmp_path, tiny_base_dir):
    paths = [saved(tmp_path, i, name, options) for i, (name, options) in enumerate(KINDS)]
    mixed = MixedAdapters(paths, base=str(tiny_base_dir))
    rows = [0, 1, 2, 3, -1, 2, 0, 1]  # every adapter, and a row of the base alone
    batch = tiny_batch(tiny_backbone(seed=0), n=len(rows))
    mixed.assign(rows)
    got = logits(mixed.model, batch)
    alone = [logits(load_adapter(p, base=str(tiny_base_dir), merge=False)[0], batch) for p in paths]
    base = logits(DiffusionLM(tiny_backbone(seed=0)).eval(), batch)
    n = got.shape[0] // len(rows)  # logits come flat over the response positions of each row
    for i, r in enumerate(rows):
        want = base if r == -1 else alone[r]
        torch.testing.assert_close(got[i * n:(i + 1) * n], want[i * n:(i + 1) * n], atol=1e-5, rtol=1e-4)
    # and the adapters really differ from each other and from the base on these rows
    assert not torch.allclose(alone[0], alone[1]) and not torch.allclose(alone[2], base, atol=1e-4)


SHAPES = [{"injection": "blocks", "ranks": [4, 2, 1]},  # two of each shape: they share a stack
          {"injection": "blocks", "ranks": [4, 2, 1]},
          {"injection": "blocks", "ranks": [3, 2, 2], "k": 1, "blocks_positions": "denoised"},
          {"injection": "blocks", "ranks": [3, 2, 2], "k": 1, "blocks_positions": "denoised"},
          {"injection": "blocks", "ranks": [2, 2, 1], "phases": "shared", "condition": False},
          {"injection": "final", "ranks": [4, 2, 1]}, {"injection": "final", "ranks": [4, 2, 1]}]


def test_a_mixed_batch_of_lora_diffusion_adapters_runs_one_stack_per_shape(tmp_path, tiny_base_dir, monkeypatch):
    from lora_diffusion.methods.lora_diffusion import LoRADiffusion

    paths = [saved(tmp_path, i, "lora_diffusion", options) for i, options in enumerate(SHAPES)]
    mixed = MixedAdapters(paths, base=str(tiny_base_dir))
    rows = [0, 1, 2, 3, 4, 5, 6, -1, 1, 5, 3]
    batch = tiny_batch(tiny_backbone(seed=0), n=len(rows), padded=True)
    t = torch.linspace(0.05, 0.95, len(rows))  # rows in every phase, as in training
    mixed.assign(rows)
    for name in ("final_delta", "block_delta"):  # the stacks serve every row: no adapter's own modules run
        monkeypatch.setattr(LoRADiffusion, name, lambda *a, **k: pytest.fail("an adapter ran its own modules"))
    got = logits(mixed.model, batch, t)
    assert [members for members, _, _ in mixed.composition.stacks] == [[0, 1], [2, 3], [4], [5, 6]]
    monkeypatch.undo()
    alone = [logits(load_adapter(p, base=str(tiny_base_dir), merge=False)[0], batch, t) for p in paths]
    base = logits(DiffusionLM(tiny_backbone(seed=0)).eval(), batch, t)
    starts = batch["response_mask"].sum(1).cumsum(0).tolist()  # logits come flat over each row's response
    for i, (r, end) in enumerate(zip(rows, starts)):
        start = starts[i - 1] if i else 0
        want = base if r == -1 else alone[r]
        torch.testing.assert_close(got[start:end], want[start:end], atol=1e-5, rtol=1e-4)
    assert all(not torch.allclose(alone[0], other, atol=1e-4) for other in alone[1:] + [base])


def test_uncalibrated_adapters_are_mixed_one_by_one_until_their_first_batch_calibrates_them(tmp_path, tiny_base_dir):
    model = DiffusionLM(tiny_backbone(seed=0))
    paths = []
    for i in range(2):
        method = make_method("lora_diffusion", {"injection": "blocks", "ranks": [4, 2, 1]})
        method.attach(model)
        perturb(method, seed=i + 1)
        save(tmp_path / f"fresh{i}", model, method)  # saved before any batch: not calibrated
        method.detach()
        paths.append(tmp_path / f"fresh{i}")
    mixed = MixedAdapters(paths, base=str(tiny_base_dir))
    mixed.assign([0, 1, 1, 0])
    batch = tiny_batch(tiny_backbone(seed=0), n=4)
    first = logits(mixed.model, batch)  # the loop: each adapter calibrates on its own rows
    assert mixed.composition.stacks == []
    second = logits(mixed.model, batch)  # now stacked, and the same
    assert len(mixed.composition.stacks) == 1
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-4)


def test_a_mixed_batch_refuses_other_methods_unassigned_rows_and_bad_indices(tmp_path, tiny_base_dir):
    lora = saved(tmp_path, 0, "lora", {"r": 2})
    bitfit = saved(tmp_path, 1, "bitfit", {})
    with pytest.raises(UserError, match="is bitfit: a mixed batch takes lora_diffusion and lora"):
        MixedAdapters([lora, bitfit], base=str(tiny_base_dir))
    weights = saved(tmp_path, 2, "lora_diffusion", {"injection": "weights", "ranks": [2, 1, 1]})
    with pytest.raises(UserError, match="injection=weights: it changes the base's projections"):
        MixedAdapters([lora, weights], base=str(tiny_base_dir))
    mixed = MixedAdapters([lora], base=str(tiny_base_dir))
    batch = tiny_batch(tiny_backbone(seed=0), n=2)
    with pytest.raises(UserError, match="assign each row an adapter before"):
        logits(mixed.model, batch)
    with pytest.raises(UserError, match="from 0 to 0"):
        mixed.assign([0, 1])


def test_sample_with_several_adapters_answers_as_each_adapter_alone(capsys, tmp_path, tiny_base_dir):
    from test_cli import run_cli

    paths = [str(saved(tmp_path, i, name, options)) for i, (name, options) in enumerate(KINDS[1:3])]
    common = ["--base", str(tiny_base_dir), "--prompt", "a story about the sea", "--steps", "4", "--length", "4"]
    code, out, err = run_cli(capsys, "sample", "--adapter", *paths, *common)
    assert code == 0, err
    mixed = out.strip().splitlines()
    assert len(mixed) == 2
    for line, path in zip(mixed, paths):
        code, alone, err = run_cli(capsys, "sample", "--adapter", path, *common)
        assert code == 0, err
        label, text = line.split(": ", 1)
        assert label == "adapter" + path[-1] and text == alone.strip()


def test_eval_with_several_adapters_scores_each_as_it_scores_alone(capsys, tmp_path, tiny_base_dir):
    import json

    from test_cli import run_cli

    paths = [str(saved(tmp_path, i, name, options)) for i, (name, options) in enumerate(KINDS)]
    common = ["--base", str(tiny_base_dir), "--max-eval-examples", "6", "--steps", "2", "--batch-size", "4"]
    code, out, err = run_cli(capsys, "eval", "--adapter", *paths, *common, "--out", str(tmp_path / "mixed.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "mixed.json").read_text())
    assert report["mixed_batch"] and [r["adapter"] for r in report["results"]] == paths
    for mixed, path in zip(report["results"], paths):
        code, out, err = run_cli(capsys, "eval", "--adapter", path, *common)
        assert code == 0, err
        alone = json.loads(out.strip().splitlines()[-1])
        for key in ("task", "n_eval", "accuracy", "verbalizer_accuracy", "invalid_rate", "chance", "method"):
            assert mixed[key] == alone[key], (path, key)


def test_evaluate_mixed_gives_each_adapter_the_answers_it_gives_alone(tmp_path, tiny_base_dir):
    from lora_diffusion.data import load_task
    from lora_diffusion.evaluate import evaluate_mixed, evaluate_task

    paths = [saved(tmp_path, i, name, options) for i, (name, options) in enumerate(KINDS)]
    task = load_task("suite_struct", max_train=8, max_eval=5)  # multi-token answers: a real trajectory
    mixed = MixedAdapters(paths, base=str(tiny_base_dir))
    results = evaluate_mixed(mixed.model, mixed.assign, len(paths), task, steps=4, batch_size=3,
                             return_predictions=True)
    answers = set()
    for result, path in zip(results, paths):
        model = load_adapter(path, base=str(tiny_base_dir), merge=False)[0]
        alone = evaluate_task(model, task, steps=4, batch_size=3, return_predictions=True)
        assert result["predictions"] == alone["predictions"] and result["rouge_l"] == alone["rouge_l"]
        answers.add(tuple(p["prediction"] for p in alone["predictions"]))
    assert len(answers) == len(paths)  # the adapters answer differently: rows were not swapped unnoticed


def test_eval_refuses_to_mix_adapters_trained_at_different_lengths(capsys, tmp_path, tiny_base_dir):
    import json

    from test_cli import run_cli

    from lora_diffusion.adapters import CONFIG_FILE

    paths = [saved(tmp_path, i, name, options) for i, (name, options) in enumerate(KINDS[:2])]
    config = json.loads((paths[1] / CONFIG_FILE).read_text())
    config["response_length"] = 4  # trained with longer answers than the other (2)
    (paths[1] / CONFIG_FILE).write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "eval", "--adapter", *map(str, paths), "--base", str(tiny_base_dir),
                             "--max-eval-examples", "2", "--steps", "2")
    assert code != 0 and "different response lengths (2, 4 tokens)" in err
    config["response_length"], config["max_length"] = 2, 64  # prompts encoded at another length
    (paths[1] / CONFIG_FILE).write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "eval", "--adapter", *map(str, paths), "--base", str(tiny_base_dir),
                             "--max-eval-examples", "2", "--steps", "2")
    assert code != 0 and "different prompt lengths (max_length) (64, 128 tokens)" in err
