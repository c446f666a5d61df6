"""The app's workspace: background training, adapters in and out; and one decoding, step by step."""

import json
import shutil
import tempfile
import time
import zipfile

import torch

import pytest
from conftest import perturb

from pathlib import Path

from lora_diffusion.adapters import load_model
from lora_diffusion.analysis.trajectories import denoising_trajectory
from lora_diffusion.data import load_task
from lora_diffusion.errors import UserError
from lora_diffusion.files import read_json
from lora_diffusion.methods import make_method
from lora_diffusion.plots import training_figure
from lora_diffusion.training import TrainConfig
from lora_diffusion.workspace import EXPORTS, Compositions, JobLimits, Workspace, plain_name, public_message


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir):
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    task = load_task("suite_sentiment", max_train=32, max_eval=8)
    job = ws.start_training(task, "lora_diffusion", {"ranks": [4, 4, 4]},
                            TrainConfig(steps=6, batch_size=4, log_every=2, eval_every=3), base=str(tiny_base_dir),
                            sampler_steps=2, monitor_examples=4)
    assert job.wait(300), job.status
    return ws, job


def test_background_training_logs_saves_and_lists(trained):
    ws, job = trained
    assert job.status == "done", job.error
    losses = [r for r in job.records if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6] and all(r["loss"] > 0 for r in losses)
    assert [r["step"] for r in job.monitor()] == [3, 6]  # periodic held-out score, then the final one
    assert job.result["n_eval"] == 8 and 0.0 <= job.result["accuracy"] <= 1.0
    listed = ws.adapters()
    assert [a["name"] for a in listed] == [job.id]
    assert listed[0]["method"] == "lora_diffusion" and listed[0]["score"] == job.result["accuracy"]
    assert listed[0]["metric"] == "accuracy"
    fig = training_figure(job.records)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [2, 4, 6]


def test_export_then_import_gives_the_same_adapter_and_its_score(trained, tiny_base_dir):
    ws, job = trained
    archive = ws.export_adapter(job.id)
    assert archive.is_relative_to(Path(tempfile.gettempdir()) / EXPORTS)  # gradio serves it, wherever ws is
    assert not list(ws.root.rglob("*.zip"))
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["adapter.safetensors", "adapter_config.json", "metrics.jsonl", "results.json"]
    name = ws.import_adapter(archive, base=str(tiny_base_dir))
    original, imported = ws.adapter_path(job.id), ws.adapter_path(name)
    assert (imported / "adapter.safetensors").read_bytes() == (original / "adapter.safetensors").read_bytes()
    listed = {a["name"]: a for a in ws.adapters()}
    assert listed[name]["status"] == "imported" and listed[name]["metric"] == "accuracy"
    assert listed[name]["score"] == listed[job.id]["score"] == job.result["accuracy"]  # the score came with it
    assert ws.curve(name) == ws.curve(job.id) != []  # and so did the training curve
    with zipfile.ZipFile(ws.export_adapter(name)) as z:  # and both go with it again
        assert json.loads(z.read("results.json"))["accuracy"] == job.result["accuracy"]
        assert z.read("metrics.jsonl") == (ws.root / job.id / "metrics.jsonl").read_bytes()


def test_results_that_are_not_the_adapters_are_refused_at_import(trained, tmp_path, tiny_base_dir):
    ws, job = trained
    before = sorted(p.name for p in ws.root.iterdir())
    with zipfile.ZipFile(ws.export_adapter(job.id)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    results = json.loads(files["results.json"])
    for bad, says in (({**results, "task": "suite_topic"}, "does not hold the held-out results of this adapter"),
                      ({**results, "accuracy": 97.5}, "accuracy must be a number between 0 and 1"),
                      ({**results, "accuracy": "high"}, "accuracy must be a number between 0 and 1"),
                      ([results], "does not hold the held-out results"),
                      ({**results, "stopped_at_step": "3"}, "stopped_at_step must be a whole number")):
        upload = tmp_path / "bad-results.zip"
        with zipfile.ZipFile(upload, "w") as z:
            for entry, data in {**files, "results.json": json.dumps(bad)}.items():
                z.writestr(entry, data)
        with pytest.raises(UserError, match=says):
            ws.import_adapter(upload, base=str(tiny_base_dir))
    assert sorted(p.name for p in ws.root.iterdir()) == before


def test_bad_uploads_are_refused_and_leave_nothing(trained, tmp_path, tiny_base_dir):
    ws, _ = trained
    before = sorted(p.name for p in ws.root.iterdir())
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("adapter.safetensors", b"x")
        z.writestr("payload.pkl", b"x")
    with pytest.raises(UserError, match="'payload.pkl'; an adapter zip holds only adapter.safetensors"):
        ws.import_adapter(evil)
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a valid zip"):
        ws.import_adapter(fake)
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("adapter.safetensors", b"garbage")
        z.writestr("adapter_config.json", '{"format": "lora-diffusion-adapter"}')
    with pytest.raises(UserError, match="not a valid lora-diffusion adapter"):
        ws.import_adapter(broken)
    deflate = tmp_path / "corrupt-deflate.zip"  # the entry's data is not deflate data: zlib.error inside zipfile
    with zipfile.ZipFile(deflate, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("adapter_config.json", "{}" * 4000)
    data = bytearray(deflate.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("adapter_config.json")
    data[start:start + 8] = b"\xff" * 8  # block type 3 does not exist
    deflate.write_bytes(bytes(data))
    with pytest.raises(UserError, match="^the upload is not a valid zip file$"):
        ws.import_adapter(deflate)
    archive = ws.export_adapter(ws.adapters()[-1]["name"])
    with zipfile.ZipFile(archive) as z:
        files = {n: z.read(n) for n in z.namelist()}
    for task in ("hub:/etc", "hub:imdb", "a/b", "a\\b"):
        config = json.loads(files["adapter_config.json"])
        config["task"]["name"] = task
        hub = tmp_path / "hub.zip"
        with zipfile.ZipFile(hub, "w") as z:
            z.writestr("adapter.safetensors", files["adapter.safetensors"])
            z.writestr("adapter_config.json", json.dumps(config))
        with pytest.raises(UserError, match="^this workbench runs offline: adapters of hub tasks cannot be used here$"):
            ws.import_adapter(hub, base=str(tiny_base_dir))
    assert sorted(p.name for p in ws.root.iterdir()) == before


def test_a_stopped_job_ends_at_once_keeps_its_adapter_unscored_and_is_listed_as_stopped(tmp_path, tiny_base_dir):
    ws = Workspace(tmp_path)
    task = load_task("suite_topic", max_train=16, max_eval=400)  # a long final evaluation, were it run
    job = ws.start_training(task, "bitfit", {}, TrainConfig(steps=5000, batch_size=2, log_every=1),
                            base=str(tiny_base_dir), sampler_steps=64, monitor_examples=400)
    while job.step < 2:  # it has trained a little
        time.sleep(0.05)
    job.stop()
    began = time.time()
    assert job.wait(60) and time.time() - began < 10
    assert job.status == "stopped" and job.result["train"]["steps"] < 5000
    step = job.stopped["step"]
    assert job.note == f"stopped by you at step {step}: the adapter is kept, not scored on the held-out split"
    assert job.monitor() == [] and "accuracy" not in job.result  # no evaluation ran
    saved = read_json(job.folder / "results.json")
    assert saved["stopped_at_step"] == step and "accuracy" not in saved and saved["train"]["stopped_early"]
    assert read_json(job.folder / "stopped.json") == {"step": step, "reason": "stopped by you"}
    assert (job.folder / "adapter" / "adapter_config.json").is_file()
    listed = ws.adapters()[0]
    assert listed["status"] == f"stopped at step {step}"  # never passes for a done run, never shows a 0% score
    assert listed["score"] is None and listed["metric"] is None


def test_the_queue_says_where_a_job_waits_and_stop_takes_it_out(tmp_path, tiny_base_dir):
    root = Workspace(tmp_path)
    alice, bob = root.user("alice-0001"), root.user("bob-00001")
    task = load_task("suite_topic", max_train=16, max_eval=4)
    first = alice.start_training(task, "bitfit", {}, TrainConfig(steps=5000, batch_size=2, log_every=1),
                                 base=str(tiny_base_dir), sampler_steps=1, monitor_examples=2)
    waiting = bob.start_training(task, "bitfit", {}, TrainConfig(steps=2, batch_size=2),
                                 base=str(tiny_base_dir), sampler_steps=1, monitor_examples=2)
    assert waiting.status == "queued" and waiting.position == 1
    with pytest.raises(UserError, match="no training job of yours"):
        bob.job(first.id)  # job ids are per user
    waiting.stop()
    assert waiting.wait(10) and waiting.status == "stopped" and waiting.result is None
    assert "nothing was trained" in waiting.note and not waiting.folder.exists()
    first.stop()
    assert first.wait(300) and first.status == "stopped"


def test_limits_refuse_big_jobs_and_too_many_per_user(tmp_path, tiny_base_dir):
    ws = Workspace(tmp_path, limits=JobLimits(steps=100, batch_size=8, jobs_per_user=1))
    task = load_task("suite_topic", max_train=16, max_eval=4)
    with pytest.raises(UserError, match="steps must be between 1 and 100"):
        ws.start_training(task, "bitfit", {}, TrainConfig(steps=101, batch_size=2))
    with pytest.raises(UserError, match="batch size must be between 1 and 8"):
        ws.start_training(task, "bitfit", {}, TrainConfig(steps=10, batch_size=9))
    job = ws.start_training(task, "bitfit", {}, TrainConfig(steps=100, batch_size=2, log_every=1),
                            base=str(tiny_base_dir), sampler_steps=1, monitor_examples=2)
    with pytest.raises(UserError, match="you have 1 training jobs queued or running"):
        ws.start_training(task, "bitfit", {}, TrainConfig(steps=10, batch_size=2))
    job.stop()
    assert job.wait(300)


def test_a_job_past_its_time_limit_stops_like_a_stopped_one(tmp_path, tiny_base_dir):
    ws = Workspace(tmp_path, limits=JobLimits(seconds=0.5))
    job = ws.start_training(load_task("suite_topic", max_train=16, max_eval=4), "bitfit", {},
                            TrainConfig(steps=5000, batch_size=2, log_every=1), base=str(tiny_base_dir),
                            sampler_steps=1, monitor_examples=2)
    assert job.wait(120) and job.status == "stopped" and job.result["train"]["steps"] < 5000
    assert job.note.startswith("stopped by the 0.00833333-minute limit per job at step")


def test_a_job_stopped_in_its_final_evaluation_ends_at_once_and_keeps_no_adapter(tmp_path, tiny_base_dir):
    ws = Workspace(tmp_path)
    task = load_task("suite_topic", max_train=16, max_eval=400)
    job = ws.start_training(task, "bitfit", {}, TrainConfig(steps=2, batch_size=2, log_every=1, eval_every=0),
                            base=str(tiny_base_dir), sampler_steps=64, monitor_examples=2)
    while job.status != "evaluating" and not job.finished:
        time.sleep(0.01)
    job.stop()
    began = time.time()
    assert job.wait(60) and time.time() - began < 10
    assert job.status == "stopped" and "final evaluation" in job.note
    assert ws.adapters() == [] and not (job.folder / "adapter").exists()


def _users_with_adapters(run: Path, root: Path) -> tuple[Workspace, Workspace]:
    """alice (two adapters), bob (one) and a shared adapter, all copies of `run`."""
    ws = Workspace(root)
    alice, bob = ws.user("alice-0001"), ws.user("bob-00001")
    for folder in (alice.root / "mine-1", alice.root / "mine-2", bob.root / "bobs", root / "shared" / "team"):
        shutil.copytree(run, folder)
    return alice, bob


def test_delete_removes_one_of_the_users_own_adapters_and_nothing_else(trained, tmp_path):
    alice, bob = _users_with_adapters(trained[1].folder, tmp_path)
    alice.delete_adapter("mine-1")
    assert not (alice.root / "mine-1").exists()
    assert [a["name"] for a in alice.adapters(include_shared=True)] == ["mine-2", "shared:team"]
    for name, says in (("shared:team", "shared adapters are read-only"), ("bobs", "no adapter named 'bobs'"),
                       ("mine-1", "no adapter named"), ("../bob-00001/bobs", "not a valid adapter name"),
                       ("compositions", "no adapter named"), ("", "no adapter name given"), (None, "no adapter name")):
        with pytest.raises(UserError, match=says):
            alice.delete_adapter(name)
    assert [a["name"] for a in bob.adapters(include_shared=True)] == ["bobs", "shared:team"]


def test_reset_removes_every_run_and_router_of_the_user_only_and_waits_for_their_jobs(trained, tmp_path,
                                                                                        tiny_base_dir):
    alice, bob = _users_with_adapters(trained[1].folder, tmp_path)
    (alice.root / "compositions" / "abc-2").mkdir(parents=True)
    job = alice.start_training(load_task("suite_topic", max_train=16, max_eval=4), "bitfit", {},
                               TrainConfig(steps=5000, batch_size=2), base=str(tiny_base_dir), sampler_steps=1)
    with pytest.raises(UserError, match=f"training job {job.id} is still queued or running: stop it first"):
        alice.reset()
    assert (alice.root / "mine-1").is_dir() and job.folder.is_dir()  # nothing removed
    job.stop()
    assert job.wait(120)
    assert alice.reset() == 3  # two adapters and the stopped run
    assert list(alice.root.iterdir()) == [] and alice.adapters() == [] and alice.jobs == {}
    assert [a["name"] for a in bob.adapters(include_shared=True)] == ["bobs", "shared:team"]
    assert alice.reset() == 0


def test_a_broken_adapter_folder_is_skipped_and_reported(trained, tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "hostile" / "adapter").mkdir(parents=True)
    (tmp_path / "hostile" / "adapter" / "adapter_config.json").write_text('{"format": "lora-diffusion-adapter"}')
    shutil.copytree(trained[1].folder, tmp_path / trained[1].id)
    assert [a["name"] for a in ws.adapters()] == [trained[1].id]
    assert [b["name"] for b in ws.broken] == ["hostile"] and "not a valid" in ws.broken[0]["reason"]
    assert str(tmp_path) not in ws.broken[0]["reason"]
    with pytest.raises(UserError, match="adapter 'hostile' is broken"):
        ws.adapter_path("hostile")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", "", "a\\b", "x\0y", ".hidden", "a" * 129,
                                  None, 3])
def test_names_are_plain_folder_names(name):
    with pytest.raises(UserError) as error:
        plain_name(name)
    assert "/" not in str(error.value)


def test_messages_name_no_server_paths(tmp_path):
    text = f"{tmp_path}/users/x/run/adapter.json is broken; see /etc/passwd and '/home/me/secret.txt'"
    assert public_message(text, tmp_path) == "users/x/run/adapter.json is broken; see passwd and 'secret.txt'"


def test_trajectory_states_and_norms(trained, tiny_base_dir):
    ws, job = trained
    model, method, _ = load_model(ws.adapter_path(job.id), base=str(tiny_base_dir))
    report = denoising_trajectory(model, "is it good ?", "very good", length=4, steps=4)
    assert len(report["steps"]) == 4
    masked = [s["state"].count("masked") for s in report["steps"]]
    assert masked == [3, 2, 1, 0]  # one position revealed per step, none hidden again
    for before, after in zip(report["steps"], report["steps"][1:]):
        for tok_b, st_b, tok_a, st_a in zip(before["tokens"], before["state"], after["tokens"], after["state"]):
            if st_b != "masked":
                assert tok_a == tok_b and st_a == "settled"
    # the default LoRA-Diffusion (blocks) adds no step delta after the body (final's case: test_methods)
    assert all(s["perturbation_norm"] is None for s in report["steps"])
    base_model, _, _ = load_model(base=str(tiny_base_dir))
    base_report = denoising_trajectory(base_model, "is it good ?", "very good", length=4, steps=4)
    assert all(s["perturbation_norm"] is None for s in base_report["steps"])
    final = make_method("lora_diffusion", {"injection": "final"})  # adds its delta after the body: a norm per step
    final.attach(base_model)
    perturb(final)
    final_report = denoising_trajectory(base_model, "is it good ?", "very good", length=4, steps=4)
    assert all(s["perturbation_norm"] > 0 for s in final_report["steps"])
    final.detach()
    with pytest.raises(UserError):
        denoising_trajectory(base_model, " ", "", length=4, steps=4)


def test_composition_trains_a_router_once_and_reloads_it(tmp_path, tiny_base_dir):
    ws = Workspace(tmp_path)
    config = TrainConfig(steps=2, batch_size=4, log_every=1, eval_every=0)
    names = []
    for name in ("suite_sentiment", "suite_topic"):
        job = ws.start_training(load_task(name, max_train=16, max_eval=4), "lora_diffusion", {"ranks": [2, 2, 2]},
                                config, base=str(tiny_base_dir), sampler_steps=1, monitor_examples=2)
        assert job.wait(300) and job.status == "done", job.error
        names.append(job.id)
    with pytest.raises(UserError, match="at least two"):
        ws.composition(names[:1], router_steps=2, base=str(tiny_base_dir))
    composition = ws.composition(names, router_steps=2, base=str(tiny_base_dir))
    assert sorted(composition.labels) == ["suite_sentiment", "suite_topic"]
    weights = composition.instruction_weights(["is this review positive or negative ?"])[0]
    assert abs(float(weights.sum()) - 1) < 1e-5
    assert ws.composition(list(reversed(names)), router_steps=2, base=str(tiny_base_dir)) is composition  # kept
    assert len(list((tmp_path / "compositions").glob("*/composition.json"))) == 1  # saved, so a restart loads it
    again = Workspace(tmp_path).composition(names, router_steps=2, base=str(tiny_base_dir))  # from disk
    assert again is not composition
    assert torch.allclose(again.instruction_weights(["is this review positive or negative ?"])[0], weights, atol=1e-6)
    # deleting one of its adapters deletes the router too, on disk and in memory
    (router,) = ws.routers()
    ws.delete_adapter(names[0])
    assert ws.routers() == {}
    assert list((tmp_path / "compositions").iterdir()) == [] and len(ws.compositions) == 0
    with pytest.raises(UserError, match="no such router in your workspace"):
        ws.router(router)


def test_every_user_shares_the_roots_routers_two_in_all(tmp_path):
    root = Workspace(tmp_path)
    alice, bob = root.user("alice-0001"), root.user("bob-00001")
    assert alice.compositions is root.compositions is bob.compositions
    kept = Compositions(size=2)
    first, second, third = object(), object(), object()
    kept.put("alice/a", first)
    kept.put("bob/b", second)
    assert kept.get("alice/a") is first  # used last now: the next one pushes bob's out
    kept.put("carol/c", third)
    assert len(kept) == 2 and kept.get("bob/b") is None and kept.get("alice/a") is first
    assert len(root.compositions) == 0 and root.compositions.size == 2


def test_invented_user_ids_share_one_queue_and_its_cap(tmp_path, tiny_base_dir):
    """The user id is not authentication: per-user limits can be side-stepped with new ids, the queue's cannot."""
    root = Workspace(tmp_path, limits=JobLimits(waiting=1))
    task = load_task("suite_topic", max_train=16, max_eval=4)

    def start(user, steps):
        return root.user(user).start_training(task, "bitfit", {}, TrainConfig(steps=steps, batch_size=2, log_every=1),
                                              base=str(tiny_base_dir), sampler_steps=1, monitor_examples=2)

    running = start("invented-0001", 5000)
    while running.status == "queued":
        time.sleep(0.02)
    waiting = start("invented-0002", 2)
    with pytest.raises(UserError, match=r"the training queue is full \(1 jobs waiting\)"):
        start("invented-0003", 2)
    assert not (tmp_path / "users" / "invented-0003").exists() or not any((tmp_path / "users" / "invented-0003").iterdir())
    for job in (waiting, running):
        job.stop()
        assert job.wait(120)
