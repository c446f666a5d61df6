"""Analyses on a tiny random base: planted answers come out, and every report has its documented shape."""

import json

import pytest
import torch

from conftest import tiny_batch, write_lines
from lora_diffusion.adapters import load_adapter, save_adapter
from lora_diffusion.analysis.composition import router_choices, score_composition
from lora_diffusion.analysis.rank import phase_means
from lora_diffusion.analysis.tsne import map_vectors, same_label_neighbours, trajectory_map, trajectory_vectors
from lora_diffusion.analysis.forgetting import forgetting_report
from lora_diffusion.analysis.trajectories import (effective_rank, effective_rank_per_layer, effective_rank_per_step,
                                                  perturbation_trajectories)
from lora_diffusion.backbone import tiny_backbone
from lora_diffusion.data import PARAPHRASES, Task, collate, encode, load_task
from lora_diffusion.diffusion import DiffusionLM, sample
from lora_diffusion.errors import UserError
from lora_diffusion.methods import make_method
from lora_diffusion.profiling import profile_generation, profile_training
from lora_diffusion.router import Composition, Router, train_router
from test_cli import run_cli


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_dir):
    """Two-step adapters of the tiny base: LoRA-Diffusion and weight LoRA for two suite tasks."""
    from lora_diffusion.cli import main

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("lora_diffusion", "lora"):
        for task in ("suite_topic", "suite_sentiment"):
            folder = root / f"{method}-{task}"
            assert main(["train", "--base", str(tiny_base_dir), "--task", task, "--method", method, "--steps", "2",
                         "--batch-size", "4", "--max-train-examples", "32", "--max-eval-examples", "8",
                         "--sampler-steps", "1", "--out", str(folder)]) == 0
            out[(method, task)] = folder
    for task in ("suite_topic", "suite_sentiment"):  # LoRA-Diffusion after every block, on every position
        folder = root / f"ld-blocks-{task}"
        assert main(["train", "--base", str(tiny_base_dir), "--task", task, "--method", "lora_diffusion",
                     "--option", "injection=blocks", "--option", "blocks_positions=all", "--option", "ranks=4,2,1",
                     "--steps", "2", "--batch-size", "4", "--max-train-examples", "32", "--max-eval-examples", "8",
                     "--sampler-steps", "1", "--out", str(folder)]) == 0
        out[("ld_blocks", task)] = folder
    return out


# The composition's adapters: both final, both blocks, or one of each.
COMPOSED = {"final": ("lora_diffusion", "lora_diffusion"), "blocks": ("ld_blocks", "ld_blocks"),
            "final+blocks": ("lora_diffusion", "ld_blocks")}


# --- planted answers --------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 3, 8])
def test_effective_rank_of_a_planted_rank_r_matrix_is_r(r):
    g = torch.Generator().manual_seed(r)
    u, _ = torch.linalg.qr(torch.randn(500, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, r, generator=g))
    assert effective_rank(u @ v.T) == pytest.approx(r, rel=1e-4)  # equal singular values: r (float32 noise aside)
    assert effective_rank(torch.zeros(5, 5)) == 0.0


def test_effective_rank_per_step_recovers_a_planted_rank_r_perturbation(tiny):
    r, d = 4, tiny.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(0)))
    model = DiffusionLM(tiny)
    model.add_step_hook(lambda h, context: torch.randn(*h.shape[:2], r) @ basis.T)  # rank r, isotropic inside
    task = load_task("suite_struct", max_eval=48)
    enc = encode(tiny.tokenizer, task.eval, 16, 128)
    traj = perturbation_trajectories(model, DiffusionLM(tiny), enc, steps=4)
    result = effective_rank_per_step(traj)
    assert traj.source == "delta" and len(result["effective_rank"]) == 4 == len(result["t"])
    assert all(abs(x - r) < 0.25 for x in result["effective_rank"])


def test_per_layer_effective_rank_finds_where_a_method_acts():
    # A rank-r change planted at the output of block 1 (of 2) and nowhere else: block 0's
    # change is zero, block 1's has effective rank r; LoRA-Diffusion `final` changes no block.
    r = 3
    base = tiny_backbone(seed=0)
    d = base.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(0)))
    model = DiffusionLM(tiny_backbone(seed=0))
    model.backbone.blocks()[1].register_forward_hook(
        lambda module, args, output: (output[0] + torch.randn(*output[0].shape[:2], r) @ basis.T,) + tuple(output[1:])
        if isinstance(output, tuple) else output + torch.randn(*output.shape[:2], r) @ basis.T)
    task = load_task("suite_struct", max_eval=48)
    enc = encode(base.tokenizer, task.eval, 16, 128)
    result = effective_rank_per_layer(model, DiffusionLM(base), enc, steps=3)
    assert result["blocks"] == 2 and len(result["effective_rank"]) == 3 == len(result["t"])
    for step in result["effective_rank"]:
        assert step[0] == 0.0 and abs(step[1] - r) < 0.25
    final = DiffusionLM(tiny_backbone(seed=0))
    method = make_method("lora_diffusion", {"injection": "final"})
    method.attach(final)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(0.1)
    result = effective_rank_per_layer(final, DiffusionLM(base), encode(base.tokenizer, task.eval[:8], 16, 128), steps=2)
    assert all(x == 0.0 for step in result["mean_norm"] for x in step)


def test_a_difference_perturbation_is_zero_for_an_untouched_model(tiny):
    model, _ = DiffusionLM(tiny_backbone(seed=0)), None
    method = make_method("lora")
    method.attach(model)  # B = 0: the fine-tuned model equals the base
    task = load_task("suite_topic", max_eval=8)
    enc = encode(tiny.tokenizer, task.eval, 2, 128)
    traj = perturbation_trajectories(model, DiffusionLM(tiny_backbone(seed=0)), enc, steps=2)
    assert traj.source == "difference" and all(float(d.abs().max()) < 1e-5 for d in traj.perturbation)


def test_profiler_counts_equal_the_methods_own_accounting():
    for name, options in (("lora", {"r": 4}), ("lora_diffusion", {"schedule": "uniform", "rank": 2}), ("bitfit", {})):
        row = profile_training(name, options, base="tiny", batch_size=2, prompt_length=8, response_length=4,
                               steps=1, warmup=1, isolated=name == "lora")  # one in a fresh process
        method = make_method(name, options)
        method.attach(DiffusionLM(tiny_backbone(seed=0)))
        own = method.accounting()
        assert row["trainable_parameters"] == own["trainable_parameters"]
        assert row["adapter_bytes"] == own["adapter_bytes"]
        n_tensors = len(method.trainable_parameters())
        # AdamW keeps two fp32 moments per parameter and one fp32 step counter per tensor
        assert row["optimizer_state_bytes"] == 8 * own["trainable_parameters"] + 4 * n_tensors
        assert row["peak_memory_bytes"] > 0 and row["sec_per_step"] > 0


def test_generation_profile_shape_and_merged_lora():
    out = profile_generation("lora", {"r": 2}, merged=True, base="tiny", batch_sizes=(1, 2), lengths=(4,),
                             steps=2, prompt_length=6, repeats=1, warmup=0)
    assert out["merged"] and [(r["batch_size"], r["response_length"]) for r in out["rows"]] == [(1, 4), (2, 4)]
    assert all(r["latency_s"] > 0 and r["tokens_per_s"] > 0 for r in out["rows"])


WORDS = ("alpha", "beta")


def _planted_task(name: str, instruction: str, answers: list[str]) -> Task:
    rows = [{"instruction": instruction, "input": f"item {i}", "response": a} for i, a in enumerate(answers)]
    return Task(name, "classification", rows, rows, list(WORDS))


@pytest.fixture(scope="module")
def planted():
    """Two hand-made LoRA-Diffusion adapters on the tiny base: adapter j answers WORDS[j] to every
    prompt of the two planted tasks (one-token answers, so one denoising step at t = 1).

    The adapters' delta is a constant shift of h (down = 0 with bias 1, so z = 1; up = the
    shift), found by gradient descent on the very states the sampler will see.
    """
    backbone = tiny_backbone(seed=0)
    with torch.no_grad():  # a random tiny head can barely prefer any word: give the two words reach
        for word in WORDS:
            backbone.word_embeddings.weight[backbone.tokenizer.convert_tokens_to_ids(word)] *= 30.0
    tasks = {"task_a": _planted_task("task_a", "say the first word .", [WORDS[0]] * 5 + [WORDS[1]] * 3),
             "task_b": _planted_task("task_b", "now give the second one please .", [WORDS[1]] * 8)}
    configs = {n: {"response_length": 1, "max_length": 64} for n in tasks}  # the word alone
    prompts = encode(backbone.tokenizer, tasks["task_a"].eval + tasks["task_b"].eval, 1, 64)
    batch = collate(prompts, range(len(prompts.prompts)), backbone.pad_id, mask_response=backbone.mask_id)
    with torch.no_grad():
        h = backbone.hidden_states(batch["input_ids"], batch["attention_mask"])[batch["response_mask"]]
    model = DiffusionLM(backbone)
    methods = []
    for j, word in enumerate(WORDS):
        method = make_method("lora_diffusion", {"schedule": "uniform", "rank": 1, "k": 1, "calibrate": False,
                                                "condition": False})
        method.add_modules(model, f"task_{j}")
        token = backbone.tokenizer.convert_tokens_to_ids(word)
        shift = torch.zeros(backbone.hidden_size, requires_grad=True)
        opt = torch.optim.Adam([shift], lr=0.1)
        for _ in range(200):
            loss = torch.nn.functional.cross_entropy(backbone.logits(h + shift), torch.full((len(h),), token))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert (backbone.logits(h + shift).argmax(-1) == token).all()
        with torch.no_grad():
            for phase in method.trajectory.sites[0].phases:
                g = phase[0]
                g.down.weight.zero_()
                g.down.bias.fill_(1.0)  # z = ReLU(1) = 1 whatever h is
                g.up.weight[:, 0] = shift
        methods.append(method)
    router = Router(backbone.word_embeddings.embedding_dim, 2, hidden=32)
    model.add_module("router", router)
    return Composition(model, methods, ["task_a", "task_b"], router), tasks, configs


def test_composition_scores_equal_the_counts_planted(planted):
    """task_a has 5 answers alpha and 3 beta, task_b 8 beta: adapter a (always alpha) scores 5/8 on
    task_a and 0 on task_b, adapter b (always beta) 3/8 and 8/8."""
    composition, tasks, configs = planted
    report = score_composition(composition, tasks, configs, sampler_steps=1, seed=0)
    assert report["interference"]["scores"] == [[5 / 8, 0.0], [3 / 8, 1.0]]
    assert report["table"]["task_a"]["own"] == 5 / 8 and report["table"]["task_b"]["own"] == 1.0
    assert report["metric"] == {"task_a": "accuracy", "task_b": "accuracy"}


def test_router_weights_sum_to_one_and_pick_the_planted_adapter(planted):
    """The router, trained on the diffusion loss, sends each task's instruction to its adapter."""
    composition, tasks, configs = planted
    train_tasks = {n: _planted_task(n, t.eval[0]["instruction"], [WORDS[j]] * 64)
                   for j, (n, t) in enumerate(tasks.items())}
    train_router(composition, train_tasks, configs, steps=60, batch_size=8, lr=1e-2, progress=False)
    w = composition.instruction_weights(["say the first word .", "now give the second one please ."])
    assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-6)
    assert w[0, 0] > 0.9 and w[1, 1] > 0.9


@pytest.mark.parametrize("kinds", list(COMPOSED))
def test_one_hot_router_weights_give_exactly_the_adapters_own_outputs(adapters, tiny_base_dir, tiny, kinds):
    paths = [adapters[(kind, t)] for kind, t in zip(COMPOSED[kinds], ("suite_topic", "suite_sentiment"))]
    composition = Composition.from_adapters(paths, base=str(tiny_base_dir))
    batch = tiny_batch(tiny, padded=True)
    t = torch.full((len(batch["input_ids"]),), 0.9)
    for j, path in enumerate(paths):
        composition.use([1.0 if k == j else 0.0 for k in range(2)])
        own, _, _ = load_adapter(path, base=str(tiny_base_dir))
        with torch.no_grad():
            mixed = composition.model(batch["input_ids"], batch["attention_mask"], t, batch["instruction"],
                                      positions=batch["response_mask"])
            alone = own(batch["input_ids"], batch["attention_mask"], t, batch["instruction"],
                        positions=batch["response_mask"])
        assert torch.equal(mixed, alone)


@pytest.mark.parametrize("kinds", list(COMPOSED))
def test_a_mixed_batch_gives_each_row_its_own_adapters_output(adapters, tiny_base_dir, tiny, kinds):
    """assign(): row i decoded with adapter rows[i] alone, in one batch, as each adapter alone does."""
    paths = [adapters[(kind, t)] for kind, t in zip(COMPOSED[kinds], ("suite_topic", "suite_sentiment"))]
    composition = Composition.from_adapters(paths, base=str(tiny_base_dir))
    batch = tiny_batch(tiny, padded=True)  # 4 rows, the last one padded
    rows = [1, 0, 0, 1]
    composition.assign(rows)
    t = torch.tensor([0.9, 0.5, 0.2, 0.7])
    args = (batch["input_ids"], batch["attention_mask"], t, batch["instruction"])
    with torch.no_grad():
        by_row = lambda logits: logits.split(batch["response_mask"].sum(1).tolist())  # read positions per row
        mixed = by_row(composition.model(*args, positions=batch["response_mask"]))
        for j, path in enumerate(paths):
            alone, _, _ = load_adapter(path, base=str(tiny_base_dir))
            own = by_row(alone(*args, positions=batch["response_mask"]))
            for i in (i for i, r in enumerate(rows) if r == j):
                assert torch.allclose(mixed[i], own[i], atol=1e-5)
    tokens, _ = sample(composition.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                       batch["instruction"], steps=2)
    assert not (tokens[batch["response_mask"]] == tiny.mask_id).any()
    with pytest.raises(UserError, match="assign one adapter"):
        composition.assign([0, 2])
    composition.use(None)  # back to the router
    assert composition.rows is None


def test_mixed_batch_throughput_is_measured_against_one_adapter(capsys, tmp_path, tiny_base_dir):
    code, stdout, err = run_cli(capsys, "analyze", "mixed-batch", "--base", tiny_base_dir, "--adapter-counts", "2,4",
                                "--batch-size", "8", "--response-length", "4", "--sampler-steps", "2",
                                "--out", tmp_path / "mixed")
    assert code == 0, err
    report = json.loads((tmp_path / "mixed" / "mixed_batch.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["lora_diffusion", "lora"]
    for m in report["methods"]:
        assert [r["adapters"] for r in m["mixed"]] == [2, 4]
        for r in m["mixed"]:
            assert r["tokens_per_s"] == 8 * 4 / r["latency_s"]
            assert r["throughput_ratio"] == m["one_adapter"]["latency_s"] / r["latency_s"]
    assert {"lora_diffusion, 4 adapters", "lora, 4 adapters"} <= json.loads(stdout.strip().splitlines()[-1]).keys()


def test_an_untouched_adapter_forgets_nothing(tmp_path, tiny_base_dir):
    """Zero-initialised adapters (LoRA-Diffusion's up = 0, weight LoRA's B = 0) change no logit, so
    their held-out NELBO is the base's to the last bit: a forgetting delta of exactly 0."""
    data = tmp_path / "data"
    lines = [f"line {i} of some plain text about the weather and the sea ." for i in range(400)]
    write_lines((data / "wikitext2").mkdir(parents=True) or data / "wikitext2" / "test.txt", lines)
    write_lines((data / "tinystories").mkdir() or data / "tinystories" / "TinyStories-valid_head_sample.txt", lines)
    task = load_task("suite_topic", max_train=8, max_eval=4)
    paths = []
    for name in ("lora_diffusion", "lora"):
        model, method = DiffusionLM(tiny_backbone(seed=0)), make_method(name)
        fingerprint = model.backbone.fingerprint()  # of the base before the method wraps it
        method.attach(model)
        save_adapter(tmp_path / name, method, model.backbone, fingerprint, task, 2, 128)
        paths.append(tmp_path / name)
    report = forgetting_report(paths, base=str(tiny_base_dir), data_dir=data, rows=4)
    for model in report["models"][1:]:
        assert model["delta_nelbo"] == {"tinystories_valid_tail20": 0.0, "wikitext2_test": 0.0}
    assert report["models"][0]["scores"]["wikitext2_test"]["nelbo"] > 0


def test_phase_means_average_the_steps_of_each_phase():
    # eight sampler steps: t = 1 ... 1/8; early is t > 2/3, late t <= 1/3
    t = [(8 - s) / 8 for s in range(8)]
    assert phase_means(t, list(range(8))) == {"early": 1.0, "middle": 4.0, "late": 6.5}
    assert phase_means([1.0], [5.0]) == {"early": 5.0, "middle": None, "late": None}


def test_same_label_neighbours_counts_the_nearest_other_point():
    # two tight pairs far apart; in the second pair the labels differ
    points = [{"x": 0.0, "y": 0.0, "task": "a"}, {"x": 0.1, "y": 0.0, "task": "a"},
              {"x": 9.0, "y": 9.0, "task": "a"}, {"x": 9.1, "y": 9.0, "task": "b"}]
    assert same_label_neighbours(points, "task") == 0.5


def test_the_map_is_the_projection_of_the_vectors(adapters, tiny_base_dir):
    paths = [adapters[("lora_diffusion", t)] for t in ("suite_topic", "suite_sentiment")]
    vectors = trajectory_vectors(paths, base=str(tiny_base_dir), n_examples=4, steps=2)
    assert vectors["perturbations"]["x"].shape == (len(vectors["perturbations"]["meta"]), 32)
    assert map_vectors(vectors, "pca") == trajectory_map(paths, base=str(tiny_base_dir), n_examples=4, steps=2,
                                                         method="pca")


def test_the_routers_right_weight_is_its_mean_weight_on_the_own_adapter(adapters, tiny_base_dir):
    paths = [adapters[("lora_diffusion", t)] for t in ("suite_topic", "suite_sentiment")]
    composition = Composition.from_adapters(paths, base=str(tiny_base_dir))
    tasks = {name: load_task(name, max_eval=4) for name in composition.labels}
    report = router_choices(composition, tasks)
    for group in ("train", "heldout"):
        weights = [float(composition.instruction_weights(PARAPHRASES[name][group])[:, j].mean())
                   for j, name in enumerate(composition.labels)]
        counts = [len(PARAPHRASES[name][group]) for name in composition.labels]
        expected = sum(w * n for w, n in zip(weights, counts)) / sum(counts)
        assert report["router_right_weight"][group] == pytest.approx(expected, abs=1e-6)


# --- every analysis runs from the CLI and writes JSON of the documented shape + HTML -----

def test_effective_rank_and_tsne_from_the_cli(capsys, tmp_path, adapters, tiny_base_dir):
    paths = [str(adapters[(m, "suite_topic")]) for m in ("lora_diffusion", "lora")]
    code, out, err = run_cli(capsys, "analyze", "effective-rank", "--adapters", *paths, "--base", str(tiny_base_dir),
                             "--examples", "8", "--sampler-steps", "2", "--per-layer", "--out", tmp_path / "rank")
    assert code == 0, err
    report = json.loads((tmp_path / "rank" / "effective_rank.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["lora_diffusion", "lora"]
    assert all(len(r["per_layer"]["effective_rank"]) == 2 and r["per_layer"]["blocks"] == 2 for r in report["methods"])
    assert (tmp_path / "rank" / "effective_rank_per_layer.html").is_file()
    # both act inside the body (LoRA-Diffusion's default is blocks): fine-tuned minus base
    assert [r["source"] for r in report["methods"]] == ["difference", "difference"]
    assert all(len(r["effective_rank"]) == len(r["t"]) == 2 for r in report["methods"])
    assert (tmp_path / "rank" / "effective_rank.html").stat().st_size > 100_000  # plotly.js embedded

    paths = [str(adapters[("lora_diffusion", t)]) for t in ("suite_topic", "suite_sentiment")]
    code, out, err = run_cli(capsys, "analyze", "tsne", "--adapters", *paths, "--base", str(tiny_base_dir),
                             "--examples", "6", "--sampler-steps", "2", "--projection", "pca", "--out", tmp_path / "map")
    assert code == 0, err
    report = json.loads((tmp_path / "map" / "tsne.json").read_text())
    assert len(report["perturbations"]["points"]) == 2 * 6 * 2  # adapters x examples x steps
    assert len(report["base"]["points"]) == 2 * 6 * 2  # tasks x examples x steps
    assert 0.0 <= report["perturbations"]["trustworthiness"] <= 1.0
    assert {p["task"] for p in report["perturbations"]["points"]} == {"suite_topic", "suite_sentiment"}
    assert (tmp_path / "map" / "tsne_perturbations_by_step.html").is_file()


def test_forgetting_from_the_cli(capsys, tmp_path, adapters, tiny_base_dir):
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "tinystories").mkdir()
    lines = [f"line {i} of some plain text about the weather and the sea ." for i in range(400)]
    write_lines(data / "wikitext2" / "test.txt", lines)
    write_lines(data / "tinystories" / "TinyStories-valid_head_sample.txt", lines)
    code, out, err = run_cli(capsys, "analyze", "forgetting", "--adapters", str(adapters[("lora", "suite_topic")]),
                             "--base", str(tiny_base_dir), "--data-dir", data, "--examples", "4", "--out", tmp_path / "f")
    assert code == 0, err
    report = json.loads((tmp_path / "f" / "forgetting.json").read_text())
    assert [m["label"].split(" ")[0] for m in report["models"]] == ["base", "lora"]
    assert report["sources"] == ["tinystories_valid_tail20", "wikitext2_test"]
    assert set(report["models"][1]["delta_nelbo"]) == set(report["sources"])


def test_composition_from_the_cli(capsys, tmp_path, adapters, tiny_base_dir):
    tasks = ("suite_topic", "suite_sentiment")
    code, out, err = run_cli(capsys, "analyze", "composition",
                             "--adapters", *[str(adapters[("lora_diffusion", t)]) for t in tasks],
                             "--lora-adapters", *[str(adapters[("lora", t)]) for t in tasks],
                             "--base", str(tiny_base_dir), "--examples", "4", "--sampler-steps", "1",
                             "--router-steps", "2", "--quiet", "--out", tmp_path / "c")
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "composition.json").read_text())
    assert report["tasks"] == list(tasks)
    assert len(report["interference"]["scores"]) == 2 and len(report["interference"]["scores"][0]) == 2
    for row in report["table"].values():
        assert set(row) >= {"own", "router", "uniform", "lora_own", "lora_linear", "lora_cat", "lora_ties"}
    assert all(abs(sum(w["weights"]) - 1) < 1e-5 for w in report["router_weights"])
    right, total = report["router_accuracy_counts"]["heldout"]
    assert total == 6  # the suite tasks ship three held-out paraphrases each
    assert report["router_accuracy"]["heldout"] == right / total
    assert "| suite_topic (accuracy) |" in (tmp_path / "c" / "composition.md").read_text()
    # the trained router is saved and loads back to the same weights per instruction
    loaded = Composition.load(tmp_path / "c" / "composition", base=str(tiny_base_dir))
    assert loaded.labels == list(tasks)
    for w in report["router_weights"][:2]:
        again = loaded.instruction_weights([w["instruction"]])[0].tolist()
        assert all(abs(a - b) < 1e-5 for a, b in zip(again, w["weights"]))


def test_scaling_and_data_efficiency_from_the_cli(capsys, tmp_path, tiny_base_dir):
    code, out, err = run_cli(capsys, "analyze", "scaling", "--base", str(tiny_base_dir), "--ranks", "1,2",
                             "--gen-ranks", "2", "--gen-batch-sizes", "1", "--gen-lengths", "4", "--sampler-steps", "2",
                             "--batch-size", "2", "--in-process", "--out", tmp_path / "s")
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "scaling.json").read_text())
    assert [(r["method"], r["rank"]) for r in report["train"]][:4] == [("lora", 1), ("lora", 2),
                                                                       ("lora_diffusion", 1), ("lora_diffusion", 2)]
    assert {r["method"] for r in report["train"]} >= {"full", "adapter", "bitfit", "prefix"}
    lora = [r for r in report["train"] if r["method"] == "lora"]
    assert lora[1]["trainable_parameters"] == 2 * lora[0]["trainable_parameters"]
    assert [(g["method"], g["merged"]) for g in report["generate"]][:4] == [
        ("base", False), ("lora", False), ("lora", True), ("lora_diffusion", False)]
    assert (tmp_path / "s" / "training.html").is_file() and (tmp_path / "s" / "generation.html").is_file()

    code, out, err = run_cli(capsys, "analyze", "data-efficiency", "--base", str(tiny_base_dir), "--task", "suite_topic",
                             "--sizes", "8,16", "--methods", "bitfit,lora", "--seeds", "0", "1", "--steps", "2",
                             "--batch-size", "4", "--max-eval-examples", "4", "--sampler-steps", "1", "--quiet",
                             "--out", tmp_path / "d")
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "data_efficiency.json").read_text())
    assert [(p["n_train"], p["method"]) for p in report["points"]] == [(8, "bitfit"), (8, "lora"), (16, "bitfit"),
                                                                       (16, "lora")]
    assert all(p["accuracy"]["n"] == 2 for p in report["points"])
    assert {p["method"]: p["lr"] for p in report["points"]} == {"bitfit": 1.5e-3, "lora": 2e-3}  # their own lrs

    # learning rates from a sweep's results file, and two runs at a time
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [{"label": "bitfit", "lr": 0.01},
                                                              {"label": "lora", "lr": 0.02}]}))
    code, out, err = run_cli(capsys, "analyze", "data-efficiency", "--base", str(tiny_base_dir), "--task", "suite_topic",
                             "--sizes", "8", "--methods", "bitfit,lora", "--seeds", "0", "--steps", "2",
                             "--batch-size", "4", "--max-eval-examples", "4", "--sampler-steps", "1", "--quiet",
                             "--lr-from", tmp_path / "sweep.json", "--jobs", "2", "--out", tmp_path / "d2")
    assert code == 0, err
    report = json.loads((tmp_path / "d2" / "data_efficiency.json").read_text())
    assert {p["method"]: p["lr"] for p in report["points"]} == {"bitfit": 0.01, "lora": 0.02}


def test_same_label_chance_is_what_a_random_map_scores():
    """The chance a random other point shares the label: sum n(n-1) / N(N-1), e.g. groups of
    2, 2 and 6 among 10 points give (2 + 2 + 30) / 90, not the largest group's 60%."""
    import numpy as np

    from lora_diffusion.analysis.tsne import same_label_chance, same_label_neighbours

    points = [{"task": t} for t in "aabbcccccc"]
    assert same_label_chance(points) == 34 / 90
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(400):  # random placements score the chance on average
        xy = rng.random((len(points), 2))
        scores.append(same_label_neighbours([{**p, "x": x, "y": y} for p, (x, y) in zip(points, xy)]))
    assert abs(np.mean(scores) - 34 / 90) < 0.03
