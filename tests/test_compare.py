"""`compare` and `bench` end to end on a tiny random base (each under a minute)."""

import json

import pytest

from test_cli import run_cli


def test_compare_smoke_with_lr_sweep_resume_and_table(capsys, tmp_path, tiny_base_dir):
    out = tmp_path / "cmp"
    argv = ["compare", "--base", str(tiny_base_dir), "--task", "suite_topic", "--methods", "lora_diffusion,lora",
            "--seed", "0", "1", "--steps", "3", "--batch-size", "4", "--max-train-examples", "40",
            "--max-eval-examples", "12", "--sampler-steps", "2", "--lr-sweep", "1,3", "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["lora_diffusion", "lora"]
    for row in results["rows"]:
        assert row["seeds"] == [0, 1] and row["accuracy"]["n"] == 2
        assert len(row["sweep"]) == 2 and row["lr"] in [s["lr"] for s in row["sweep"]]
        assert row["trainable_parameters"] > 0 and row["adapter_bytes"] >= 4 * row["trainable_parameters"]
        assert row["profile"]["peak_memory_bytes"] > 0 and row["profile"]["sec_per_step"] > 0
    assert results["budget"]["examples_seen"] == 12 and results["budget"]["n_train"] == 40
    table = (out / "results.md").read_text()
    assert "| lora_diffusion |" in table and "| lora |" in table and table.strip() in stdout
    # a second call reads every finished run back instead of training again
    mtime = (out / "lora" / "seed-1" / "results.json").stat().st_mtime
    code, _, _ = run_cli(capsys, *argv, "--no-profile")
    assert code == 0 and (out / "lora" / "seed-1" / "results.json").stat().st_mtime == mtime


def test_bench_reports_ratios_throughput_and_flops_on_the_same_batch(capsys, tmp_path, tiny_base_dir):
    code, stdout, err = run_cli(capsys, "bench", "--base", str(tiny_base_dir), "--methods", "lora_diffusion,full",
                                "--batch-size", "4", "--prompt-length", "12", "--response-length", "4",
                                "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "p.json"))
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["reference"] == "lora_diffusion"
    ratio = result["ratios_of_reference_to"]["full"]
    rows = {r["method"]: r for r in result["rows"]}
    assert ratio["step_time_ratio"] == rows["lora_diffusion"]["sec_per_step"] / rows["full"]["sec_per_step"]
    assert rows["full"]["trainable_parameters"] > rows["lora_diffusion"]["trainable_parameters"]
    assert json.loads((tmp_path / "p.json").read_text())["rows"][0]["optimizer_state_bytes"] > 0
    written = {r["method"]: r for r in json.loads((tmp_path / "p.json").read_text())["rows"]}
    for r in written.values():
        assert r["tokens_per_s"] == 4 * (12 + 4) / r["sec_per_step"]
        assert r["achieved_flops_per_s"] == r["flops_per_step"] / r["sec_per_step"]
        assert r["mfu"] is None and r["peak_flops_per_s"] is None  # a CPU's peak is not known
    # full fine-tuning also computes the body's and the head's weight gradients; LoRA-Diffusion
    # (blocks) backpropagates through the body for its activations only
    assert written["full"]["flops_per_step"] > written["lora_diffusion"]["flops_per_step"]


def test_bench_times_a_presets_rows_and_their_generation_against_the_base(capsys, tmp_path, tiny_base_dir):
    code, stdout, err = run_cli(capsys, "bench", "--base", str(tiny_base_dir), "--preset", "stepaware",
                                "--rows", "lora", "LD blocks all 12/6/1", "--generation", "--batch-size", "4",
                                "--prompt-length", "12", "--response-length", "4", "--steps", "2", "--warmup", "1",
                                "--out", str(tmp_path / "bench.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["lora", "LD blocks all 12/6/1"] and report["reference"] == "lora"
    assert rows["LD blocks all 12/6/1"]["options"]["ranks"] == [12, 6, 1]
    # as served: weight LoRA merged into the base, LoRA-Diffusion beside it
    assert rows["lora"]["generation"]["merged"] and not rows["LD blocks all 12/6/1"]["generation"]["merged"]
    base_latency = rows["lora"]["generation"]["base_latency_s"]
    for r in rows.values():  # one timing of the base, every row against it
        g = r["generation"]
        assert g["base_latency_s"] == base_latency and g["overhead"] == g["latency_s"] / base_latency - 1
        assert g["tokens_per_s"] == 4 * 4 / g["latency_s"]
    table = (tmp_path / "bench.md").read_text()
    assert "| LD blocks all 12/6/1 |" in table and "generation overhead" in table
    code, _, err = run_cli(capsys, "bench", "--base", str(tiny_base_dir), "--preset", "stepaware",
                           "--option", "r=4")
    assert code != 0 and "--option needs a single method" in err


def test_bench_is_still_profile_and_knows_the_peak_of_the_lent_gpus():
    from lora_diffusion.cli import build_parser, cmd_bench
    from lora_diffusion.profiling import peak_flops

    assert build_parser().parse_args(["profile"]).func is cmd_bench
    assert peak_flops("NVIDIA H200", bf16=True, tf32=False) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=False, tf32=True) == 494e12
    assert peak_flops("NVIDIA H100 80GB HBM3", bf16=False, tf32=False) == 67e12
    assert peak_flops(None, bf16=True, tf32=False) is None


def test_sweep_only_then_lr_from(capsys, tmp_path, tiny_base_dir):
    common = ["--base", str(tiny_base_dir), "--task", "suite_topic", "--methods", "bitfit", "--steps", "2",
              "--batch-size", "4", "--max-train-examples", "40", "--max-eval-examples", "8", "--sampler-steps", "1",
              "--quiet", "--no-profile"]
    code, stdout, err = run_cli(capsys, "compare", *common, "--seed", "0", "--lr-sweep", "0.5,2", "--sweep-only",
                                "--out", str(tmp_path / "sweep"))
    assert code == 0, err
    sweep = json.loads((tmp_path / "sweep" / "results.json").read_text())
    chosen = sweep["rows"][0]["lr"]
    assert "accuracy" not in sweep["rows"][0] and "chosen lr" in stdout
    assert not (tmp_path / "sweep" / "bitfit").exists()  # no seed runs after a sweep-only
    code, _, err = run_cli(capsys, "compare", *common, "--seed", "0", "--lr-from", str(tmp_path / "sweep" / "results.json"),
                           "--out", str(tmp_path / "table"))
    assert code == 0, err
    assert json.loads((tmp_path / "table" / "results.json").read_text())["rows"][0]["lr"] == chosen
    # With --lr-sweep as well, only the rows the file does not name are swept (here in
    # two processes); the named ones keep the file's lr.
    common[common.index("bitfit")] = "bitfit,lora"
    code, _, err = run_cli(capsys, "compare", *common, "--seed", "0", "--lr-from", str(tmp_path / "sweep" / "results.json"),
                           "--lr-sweep", "0.5,2", "--jobs", "2", "--out", str(tmp_path / "mixed"))
    assert code == 0, err
    bitfit, lora = json.loads((tmp_path / "mixed" / "results.json").read_text())["rows"]
    assert bitfit["lr"] == chosen and "sweep" not in bitfit
    assert [s["lr"] for s in lora["sweep"]] == [1e-3, 4e-3] and lora["lr"] in (1e-3, 4e-3)
    assert sorted(p.name for p in (tmp_path / "mixed" / "sweep" / "lora").iterdir()) == ["lr-0.001", "lr-0.004"]
    # Without --lr-sweep a row the file does not name is refused before any training.
    code, _, err = run_cli(capsys, "compare", *common, "--seed", "0", "--lr-from", str(tmp_path / "sweep" / "results.json"),
                           "--out", str(tmp_path / "refused"))
    assert code == 2 and "no learning rate given for lora" in err and not (tmp_path / "refused").exists()


def test_a_chosen_lr_carries_only_to_a_row_that_trains_the_same_options(tmp_path):
    from lora_diffusion.compare import Spec, _carried_lr, learning_rates_from
    from lora_diffusion.errors import UserError
    from lora_diffusion.methods import method_config

    final = method_config("lora_diffusion", {"injection": "final"}).to_dict()
    (tmp_path / "r.json").write_text(json.dumps({"rows": [
        {"label": "ld", "method": "lora_diffusion", "config": final, "lr": 3e-3},
        # rows of a file from before "config": LoRA-Diffusion's default injection was final then
        {"label": "old", "method": "lora_diffusion", "options": {}, "lr": 1e-3},
        {"label": "old blocks", "method": "lora_diffusion", "options": {"injection": "blocks"}, "lr": 2e-4}]}))
    chosen = learning_rates_from(tmp_path / "r.json")
    assert _carried_lr(Spec("ld", "lora_diffusion", {"injection": "final"}), chosen["ld"]) == 3e-3
    assert _carried_lr(Spec("old", "lora_diffusion", {"injection": "final"}), chosen["old"]) == 1e-3
    assert _carried_lr(Spec("old blocks", "lora_diffusion", {"injection": "blocks", "blocks_positions": "denoised"}),
                       chosen["old blocks"]) == 2e-4
    with pytest.raises(UserError, match=r"injection=final, this row trains injection=blocks"):
        _carried_lr(Spec("old", "lora_diffusion"), chosen["old"])  # today's default is blocks
    with pytest.raises(UserError, match=r"blocks_positions=denoised, this row trains blocks_positions=all"):
        _carried_lr(Spec("old blocks", "lora_diffusion", {"injection": "blocks"}), chosen["old blocks"])
    assert _carried_lr(Spec("x", "lora"), 5e-4) == 5e-4  # a number given by the caller is taken as it is
    with pytest.raises(UserError, match=r"injection=final, this row trains injection=blocks"):
        _carried_lr(Spec("ld", "lora_diffusion", {"injection": "blocks"}), chosen["ld"])
    with pytest.raises(UserError, match=r"for method lora_diffusion, not lora"):
        _carried_lr(Spec("ld", "lora"), chosen["ld"])


def test_every_preset_is_valid_and_stepaware_stays_near_loras_budget():
    from lora_diffusion.backbone import load_backbone
    from lora_diffusion.compare import PRESETS
    from lora_diffusion.diffusion import DiffusionLM
    from lora_diffusion.methods import make_method

    model = DiffusionLM(load_backbone())  # the shipped base: the counts the preset's comment states
    counts = {}
    for spec in PRESETS["stepaware"]:
        method = make_method(spec.method, spec.options)
        method.attach(model)
        counts[spec.label] = method.accounting()["trainable_parameters"]
        method.detach()
    assert counts["lora"] == 294_912
    assert all(n <= counts["lora"] for label, n in counts.items() if label != "nara")
    assert counts["nara"] <= 1.07 * counts["lora"]
    assert all(len({s.label for s in specs}) == len(specs) for specs in PRESETS.values())


def test_rows_pick_labelled_rows_of_a_preset_and_refuse_unknown_ones():
    import pytest

    from lora_diffusion.compare import specs_from
    from lora_diffusion.errors import UserError

    picked = specs_from("stepaware", rows=["LD weights 6/3/1 k=1", "lora"])
    assert [s.label for s in picked] == ["lora", "LD weights 6/3/1 k=1"]  # the preset's order
    with pytest.raises(UserError, match="has no row 'LD weights'; its rows: lora, nara"):
        specs_from("stepaware", rows=["LD weights"])
    with pytest.raises(UserError, match="--rows picks rows of a --preset"):
        specs_from(methods=["lora"], rows=["lora"])


def test_compare_with_two_jobs_gives_the_sequential_results(capsys, tmp_path, tiny_base_dir):
    """--jobs 2 trains runs side by side in their own processes: same rows, same scores."""
    common = ["--base", str(tiny_base_dir), "--task", "suite_topic", "--methods", "bitfit,lora_diffusion",
              "--seed", "0", "1", "--steps", "2", "--batch-size", "4", "--max-train-examples", "40",
              "--max-eval-examples", "8", "--sampler-steps", "1", "--quiet", "--no-profile", "--threads", "2"]
    results = {}
    for jobs in ("1", "2"):
        code, _, err = run_cli(capsys, "compare", *common, "--jobs", jobs, "--out", str(tmp_path / jobs))
        assert code == 0, err
        results[jobs] = json.loads((tmp_path / jobs / "results.json").read_text())
    assert results["2"]["jobs"] == 2 and "jobs" not in results["1"]
    for seq, par in zip(results["1"]["rows"], results["2"]["rows"]):
        assert seq["label"] == par["label"] and par["seeds"] == [0, 1]
        assert seq["accuracy"]["values"] == par["accuracy"]["values"]
        assert abs(seq["final_train_loss"]["mean"] - par["final_train_loss"]["mean"]) < 1e-3
    assert "2 runs at a time" in (tmp_path / "2" / "results.md").read_text()
    code, _, err = run_cli(capsys, "compare", *common, "--jobs", "0", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--jobs: wants a whole number >= 1" in err


def test_a_sweep_table_row_with_a_given_lr_keeps_its_columns():
    from lora_diffusion.compare import sweep_markdown

    table = sweep_markdown({"lr_sweep": [0.5, 2], "rows": [
        {"label": "swept", "lr": 2e-3, "sweep": [{"lr": 5e-4, "validation_score": 0.5}, {"lr": 2e-3, "validation_score": 0.75}]},
        {"label": "given", "lr": 3e-3}]})
    swept, given = table.splitlines()[2:]
    assert swept == "| swept | 50.0 (0.0005) | **75.0** (0.002) | 0.002 |"
    assert given == "| given | (given) | (given) | 0.003 |"


def test_ablation_presets_share_their_default_row_and_ablations_holds_every_row_once():
    from lora_diffusion.compare import ABLATIONS, PRESETS

    rows = {}
    for name in ABLATIONS:
        assert "default" in [s.label for s in PRESETS[name]]
        for spec in PRESETS[name]:
            assert rows.setdefault(spec.label, spec) == spec  # one label, one row, in every preset
    assert PRESETS["ablations"] == list(rows.values())
    assert PRESETS["ranks"][-1].options == {}  # "default" is the method's defaults


def test_a_shared_out_folder_reads_back_only_runs_of_the_same_row(capsys, tmp_path, tiny_base_dir):
    """Presets share an --out folder (folders are named by label): a finished run is read back
    for a row that trains the same things, and refused for one that does not."""
    out = tmp_path / "cmp"
    common = ["--base", str(tiny_base_dir), "--task", "suite_topic", "--seed", "0", "--steps", "2",
              "--batch-size", "4", "--max-train-examples", "40", "--max-eval-examples", "8", "--sampler-steps", "2",
              "--no-profile", "--quiet", "--out", str(out)]
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", *common)
    assert code == 0, err
    mtime = (out / "lora" / "seed-0" / "results.json").stat().st_mtime
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", *common)  # the same row: read back
    assert code == 0 and (out / "lora" / "seed-0" / "results.json").stat().st_mtime == mtime
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", "--option", "r=4", *common)
    assert code != 0 and "holds a run with r=16, not 4" in err and "use another --out" in err
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", *common[:-1], str(out), "--steps", "3")
    assert code != 0 and "holds a run with steps=2, not 3" in err
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", *common, "--max-train-examples", "20")
    assert code != 0 and "holds a run with n_train=40, not 20" in err
    code, _, err = run_cli(capsys, "compare", "--methods", "lora", *common, "--sampler-steps", "3")
    assert code != 0 and "holds a run with sampler_steps=2, not 3" in err
