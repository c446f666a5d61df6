"""The app's trust boundary: every endpoint that takes a name or a path, and hostile adapter uploads.

Each refusal must be one readable line without a server path, and nothing may be read from,
loaded from or written to outside the workspace, the upload folder and results/: a sentinel
folder beside the workspace holds a real adapter and a real results file, and must be the
same after every test. The handlers are called directly (module-level functions); then a
selection of the same cases goes through the HTTP API of the app in a subprocess, whose log
must show no traceback.
"""

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from lora_diffusion import router
from lora_diffusion.analysis import rank
from lora_diffusion.app import analyse_tab, compare_tab, generate_tab, main, train_tab
from lora_diffusion.app.common import BASE_ONLY, Context
from lora_diffusion.data import load_task
from lora_diffusion.files import load_tensors, read_json
from lora_diffusion.paths import CHECKOUT
from lora_diffusion.training import TrainConfig
from lora_diffusion.uploads import ADAPTER_ENTRIES
from lora_diffusion.workspace import EXPORTS, Workspace
from test_app import running_app

USER, OTHER = "boundary-user-0001", "boundary-user-0002"
NOOP = lambda *a, **k: None  # noqa: E731  (stands in for gr.Progress)
# An absolute path in a message: a slash that starts a word (peft/adapter_model... is relative).
ABSOLUTE = re.compile(r"(?<![\w.~:-])/[^\s'\"/]+")


class World:
    """The workspace, the upload folder and the sentinel folder outside both, in one tmp folder."""

    def __init__(self, root: Path, base: Path):
        self.root, self.base = root, base
        self.workspace, self.uploads, self.outside = root / "ws", root / "uploads", root / "outside"
        self.uploads.mkdir(parents=True)
        self.ctx = Context(Workspace(self.workspace), base=str(base), uploads=self.uploads)

    def own(self, user=USER) -> Path:
        return self.workspace / "users" / user

    def snapshot(self) -> dict:
        """Every file outside the workspace and the upload folder that a leak could touch."""
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in (self.outside, self.base)
                for p in folder.rglob("*")}


def _train(ws: Workspace, base, method="lora_diffusion", options=None):
    task = load_task("suite_sentiment", max_train=8, max_eval=2)
    job = ws.start_training(task, method, options or {"ranks": [2, 2, 2]},
                            TrainConfig(steps=1, batch_size=2, log_every=1, eval_every=0),
                            base=str(base), sampler_steps=1, monitor_examples=1)
    assert job.wait(120) and job.status == "done", job.error
    return job


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base_dir):
    world = World(tmp_path_factory.mktemp("boundary"), tiny_base_dir)
    outside = Workspace(world.outside / "ws")
    world.good_run = _train(outside, tiny_base_dir).folder  # a real adapter, outside the workspace
    world.lora_run = _train(outside, tiny_base_dir, "lora", {"r": 2}).folder  # with its peft/ copy
    world.good = world.good_run.name
    shutil.copytree(world.good_run, world.own() / world.good)  # the same adapter, the user's own
    shipped = CHECKOUT / "results" / "compare_sst2.json" if CHECKOUT else None
    if shipped and shipped.is_file():  # a results file, outside
        shutil.copy(shipped, world.outside / "compare.json")
    else:
        (world.outside / "compare.json").write_text(json.dumps({"rows": [], "budget": {}}))
    hostile = world.workspace / "users" / USER / "hostile-run" / "adapter"  # must not stop the app
    hostile.mkdir(parents=True)
    (hostile / "adapter_config.json").write_text('{"format": "lora-diffusion-adapter"}')
    return world


@pytest.fixture(autouse=True)
def nothing_changes_outside(request):
    """Whatever a test does, the sentinel folder and the base are left as they were."""
    if "world" not in request.fixturenames:
        yield
        return
    world = request.getfixturevalue("world")
    before = world.snapshot()
    yield
    assert world.snapshot() == before


def readable(message: str, world: World) -> str:
    """`message` if it is one readable line without a server path; else the test fails."""
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, message
    assert str(world.root) not in message and not ABSOLUTE.search(message), message
    return message


def refused(world: World, call) -> str:
    """The message a handler call is refused with (a generator is run to its end)."""
    with pytest.raises(gr.Error) as error:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return readable(error.value.message, world)


# ---- every endpoint that takes a name or a path -------------------------------------------

BAD_NAMES = ["../x", "/etc/passwd", "{outside_run}", "{outside_adapter}", "a/b", "..", "", "../../../outside/ws/{run}",
             "x\0y", "shared:../x", "shared:/etc/passwd", "{good}/adapter"]
TRAIN = dict(task_name="suite_sentiment", csv_file=None, text_column="text", label_column="label", max_train=8,
             method="bitfit", options={}, lr=0, steps=1, batch_size=2, seed=0)

ENDPOINTS = {  # endpoint -> call(world, user, name) with `name` where the endpoint takes a name or a path
    "download": lambda w, u, n: train_tab.download(w.ctx, u, n),
    "generate": lambda w, u, n: generate_tab.generate(w.ctx, u, n, [], "is it good ?", "fine .", 2, 2, 0.0, 0),
    "generate-composed": lambda w, u, n: generate_tab.generate(w.ctx, u, BASE_ONLY, [w.good, n], "is it ?", "x",
                                                               2, 2, 0.0, 0),
    "effective_rank": lambda w, u, n: analyse_tab.effective_rank(w.ctx, u, [n], 8, 2, progress=NOOP),
    "trajectory_tsne": lambda w, u, n: analyse_tab.trajectory_tsne(w.ctx, u, [w.good, n], 8, 2, "pca", progress=NOOP),
    "forgetting": lambda w, u, n: analyse_tab.forgetting(w.ctx, u, [n], 8, progress=NOOP),
    "route": lambda w, u, n: analyse_tab.route(w.ctx, u, [w.good, n], "is it good ?", progress=NOOP),
    "upload": lambda w, u, n: train_tab.upload(w.ctx, u, [n]),
    "delete": lambda w, u, n: train_tab.delete(w.ctx, u, n),
    "train-csv": lambda w, u, n: train_tab.train(w.ctx, u, **dict(TRAIN, task_name="uploaded CSV", csv_file=n),
                                                 progress=NOOP),
    "stop": lambda w, u, n: train_tab.stop(w.ctx, u, n),
    "show_results": lambda w, u, n: compare_tab.show_results(w.ctx, n),
    "show_scaling": lambda w, u, n: compare_tab.show_scaling(w.ctx, n),
}


def _name(world: World, template: str) -> str:
    return template.format(outside_run=world.good_run, outside_adapter=world.good_run / "adapter",
                           run=world.good, good=world.good)


@pytest.mark.parametrize("template", BAD_NAMES)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_every_endpoint_refuses_names_and_paths_outside_the_workspace(world, endpoint, template):
    if template == "" and endpoint in ("stop", "generate"):
        return  # no job to stop; no adapter: the base model alone
    refused(world, lambda: ENDPOINTS[endpoint](world, USER, _name(world, template)))


@pytest.mark.parametrize("user", ["../x", "/etc", "{outside_run}", "a/b", "..", "", None, "short"])
@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if not e.startswith("show_")])
def test_every_endpoint_refuses_a_user_id_that_is_not_a_plain_name(world, endpoint, user):
    user = _name(world, user) if user else user
    # Everything else in the call is valid, so the user id is what is refused: `upload` checks
    # its files first, so it gets a real upload (a valid adapter zip in the upload folder).
    name = str(_zip(world, "user-check", _adapter_files(world))) if endpoint == "upload" else world.good
    before = sorted(world.workspace.rglob("*"))
    message = refused(world, lambda: ENDPOINTS[endpoint](world, user, name))
    assert "user id" in message
    assert sorted(world.workspace.rglob("*")) == before


def test_another_users_adapter_and_job_are_not_found(world):
    message = refused(world, lambda: train_tab.download(world.ctx, OTHER, world.good))
    assert message == f"no adapter named {world.good!r} in your workspace"
    job = world.ctx.workspace.user(USER).start_training(
        load_task("suite_topic", max_train=8, max_eval=2), "bitfit", {}, TrainConfig(steps=5000, batch_size=2),
        base=str(world.base), sampler_steps=1, monitor_examples=1)
    try:
        assert "no training job of yours" in refused(world, lambda: train_tab.stop(world.ctx, OTHER, job.id))
        assert not job.stop_requested
    finally:
        assert train_tab.stop(world.ctx, USER, job.id).startswith(("stop", "the job has already ended"))
        assert job.wait(120)


def test_reset_deletes_the_callers_own_runs_and_nothing_else(world):
    user = "boundary-user-0003"
    shutil.copytree(world.good_run, world.own(user) / world.good)
    shutil.copytree(world.good_run, world.workspace / "shared" / "team", dirs_exist_ok=True)
    others = sorted(p for p in world.workspace.rglob("*") if not p.is_relative_to(world.own(user)))
    for bad in ("../x", "/etc", "..", "", None, "short"):
        assert "user id" in refused(world, lambda: train_tab.reset(world.ctx, bad, True))
    assert train_tab.reset(world.ctx, user, True) == ("deleted all your runs and adapters (1)", False)
    assert list(world.own(user).iterdir()) == []
    assert sorted(p for p in world.workspace.rglob("*") if not p.is_relative_to(world.own(user))) == others


def test_compare_reads_only_listed_files_and_does_not_say_whether_others_exist(world):
    outside = str(world.outside / "compare.json")
    missing = str(world.outside / "missing.json")
    messages = {refused(world, lambda n=n: compare_tab.show_results(world.ctx, n)) for n in (outside, missing)}
    assert messages == {compare_tab.NOT_LISTED}
    (world.workspace / "results").mkdir(exist_ok=True)
    shutil.copy(outside, world.workspace / "results" / "mine.json")  # the workspace's own results/ is read
    assert "workspace/results/mine.json" in compare_tab.results_files(world.ctx, "compare")
    if CHECKOUT and (CHECKOUT / "results" / "compare_sst2.json").is_file():
        table, _ = compare_tab.show_results(world.ctx, "workspace/results/mine.json")
        assert "| lora_diffusion |" in table


def test_a_download_is_written_to_the_callers_own_folder_in_the_temp_folder(world):
    """Gradio serves files from the working directory and the temp folder only: the workspace may be elsewhere."""
    before = sorted(world.workspace.rglob("*"))
    archive = Path(train_tab.download(world.ctx, USER, world.good))
    assert archive.is_file() and archive.is_relative_to(Path(tempfile.gettempdir()) / EXPORTS)
    assert archive.parent == world.ctx.workspace.user(USER).exports() != world.ctx.workspace.user(OTHER).exports()
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["adapter.safetensors", "adapter_config.json",
                                                           "metrics.jsonl", "results.json"]
    assert sorted(world.workspace.rglob("*")) == before  # nothing written into the workspace


# ---- hostile uploads ----------------------------------------------------------------------

def _zip(world: World, name: str, entries: dict) -> Path:
    path = world.uploads / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for entry, data in entries.items():
            z.writestr(entry, data)
    return path


def _adapter_files(world: World) -> dict:
    folder = world.good_run / "adapter"
    return {f: (folder / f).read_bytes() for f in ("adapter.safetensors", "adapter_config.json")}


def _hostile(world: World) -> dict:
    """name -> (zip entries, what the refusal says), for one hostile upload each."""
    files = _adapter_files(world)
    config = json.loads(files["adapter_config.json"])
    tensors = load_tensors(world.good_run / "adapter" / "adapter.safetensors")
    flat = {k: v.flatten() for k, v in tensors.items()}  # the same counts, other shapes: only a load sees it
    nan = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    return {
        "config-only-format": ({**files, "adapter_config.json": '{"format": "lora-diffusion-adapter"}'},
                               "not a valid lora-diffusion adapter"),
        "config-missing-method": ({**files, "adapter_config.json": json.dumps(
            {k: v for k, v in config.items() if k != "method"})}, "field 'method'"),
        "config-not-json": ({**files, "adapter_config.json": "{nope"}, "not valid JSON"),
        "tensors-not-safetensors": ({**files, "adapter.safetensors": b"\x00" * 64}, "safetensors"),
        "tensors-of-another-adapter": ({**files, "adapter.safetensors": safetensors_bytes({"x": torch.zeros(3)})},
                                       "do not belong together"),
        "tensors-of-another-shape": ({**files, "adapter.safetensors": safetensors_bytes(flat)}, "shape"),
        "tensors-nan": ({**files, "adapter.safetensors": safetensors_bytes(nan)}, "NaN"),
        "entry-name-too-long": ({**files, "a" * 300 + ".json": "{}"}, "an adapter zip holds only"),
        "many-entries": ({**files, **{f"x{i}.json": "{}" for i in range(190)}}, "entries"),
        "entry-over-its-cap": ({**files, "adapter_config.json": " " * (2**20 + 1)}, "more than 1 MB"),
        "executable": ({**files, "run.sh": "#!/bin/sh\nrm -rf ~\n"}, "'run.sh'"),
        "pickle": ({**files, "payload.pkl": b"\x80\x04."}, "'payload.pkl'"),
        "nested-dotdot": ({"../adapter.safetensors": files["adapter.safetensors"],
                           "adapter_config.json": files["adapter_config.json"]}, "'../adapter.safetensors'"),
        "nested-absolute": ({**files, "/tmp/adapter_config.json": "{}"}, "an adapter zip holds only"),
        "nested-folder": ({"adapter/adapter.safetensors": files["adapter.safetensors"],
                           "adapter/adapter_config.json": files["adapter_config.json"]}, "an adapter zip holds only"),
        "peft-half": ({**files, "peft/adapter_config.json": "{}"}, "peft/ folder needs both"),
        "missing-tensors": ({"adapter_config.json": files["adapter_config.json"]}, "no adapter.safetensors"),
    }


def _patched(world: World, name: str, method: int | None = None, flags: int = 0) -> Path:
    """The adapter's files as a zip whose first entry claims another compression `method` or `flags` (bit 0:
    encrypted); its stored bytes are 0xff, which is not deflate data (block type 3 does not exist)."""
    path = world.uploads / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("adapter_config.json", b"\xff" * 64)
        z.writestr("adapter.safetensors", _adapter_files(world)["adapter.safetensors"])
    data = bytearray(path.read_bytes())
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local header, central directory
        start = data.index(signature) + at
        data[start:start + 2] = flags.to_bytes(2, "little")
        if method is not None:
            data[start + 2:start + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def _header_lies(world: World) -> Path:
    """A zip whose headers say its 2 MB entry holds 10 bytes: only real bytes are counted, and the CRC fails."""
    path = _zip(world, "header-lies", {"adapter_config.json": " " * 2**21})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset
        data[at:at + 4] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


HOSTILE = ["config-only-format", "config-missing-method", "config-not-json", "tensors-not-safetensors",
           "tensors-of-another-adapter", "tensors-of-another-shape", "tensors-nan", "entry-name-too-long",
           "many-entries", "entry-over-its-cap", "executable", "pickle", "nested-dotdot", "nested-absolute",
           "nested-folder", "peft-half", "missing-tensors"]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_upload_is_refused_and_leaves_nothing(world, case):
    entries, says = _hostile(world)[case]
    before = sorted(world.own().iterdir())
    message = refused(world, lambda: train_tab.upload(world.ctx, USER, [str(_zip(world, case, entries))]))
    assert says in message
    assert sorted(world.own().iterdir()) == before


def test_uploads_that_are_not_zips_or_lie_about_their_size_leave_nothing(world):
    before = sorted(world.own().iterdir())
    (world.uploads / "fake.zip").write_bytes(b"PK not a zip")
    (world.uploads / "evil.sh").write_text("#!/bin/sh\n")
    for files, says in (([world.uploads / "fake.zip"], "not a valid zip"), ([_header_lies(world)], "not a valid zip"),
                        ([_patched(world, "corrupt-deflate", method=zipfile.ZIP_DEFLATED)], "not a valid zip"),
                        ([_patched(world, "unsupported-compression", method=97)], "not a valid zip"),
                        ([_patched(world, "encrypted", flags=1)], "not a valid zip"),
                        ([world.uploads / "evil.sh"], "upload adapter.safetensors and adapter_config.json"),
                        ([world.uploads / "fake.zip"] * 3, "upload the adapter zip")):
        assert says in refused(world, lambda: train_tab.upload(world.ctx, USER, [str(f) for f in files]))
    assert sorted(world.own().iterdir()) == before


def test_the_total_is_counted_on_the_bytes_unpacked(world, monkeypatch):
    from lora_diffusion import uploads
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 2**16)
    monkeypatch.setitem(uploads.ADAPTER_ENTRIES, "adapter.safetensors", 2**16)
    monkeypatch.setitem(uploads.ADAPTER_ENTRIES, "peft/adapter_model.safetensors", 2**16)
    before = sorted(world.own().iterdir())
    big = {"adapter.safetensors": b"\x00" * 40_000, "peft/adapter_model.safetensors": b"\x00" * 40_000}
    message = refused(world, lambda: train_tab.upload(world.ctx, USER, [str(_zip(world, "total", big))]))
    assert "the zip unpacks to more than" in message
    assert sorted(world.own().iterdir()) == before


def test_the_adapters_own_files_come_back_in_peft_layout_too(world):
    exported = world.ctx.workspace.user(OTHER)
    shutil.copytree(world.lora_run, exported.root / world.lora_run.name)
    archive = exported.export_adapter(world.lora_run.name)
    assert sorted(zipfile.ZipFile(archive).namelist()) == sorted(ADAPTER_ENTRIES)
    uploaded = world.uploads / "lora.zip"
    shutil.copy(archive, uploaded)
    message = train_tab.upload(world.ctx, USER, [str(uploaded)])
    name = re.search(r"\*\*(.+)\*\*", message).group(1)
    assert (world.own() / name / "adapter" / "peft" / "adapter_model.safetensors").is_file()


def _of_task(world: World, task: str) -> dict:
    """The good adapter's files, its config naming another task."""
    files = _adapter_files(world)
    config = json.loads(files["adapter_config.json"])
    config["task"]["name"] = task
    return {**files, "adapter_config.json": json.dumps(config)}


@pytest.fixture
def tasks_loaded(monkeypatch):
    """Every task the analyses and routers load by name, in order (they are refused before that here)."""
    loaded = []
    for module in (rank, router):
        real = module.load_task
        monkeypatch.setattr(module, "load_task", lambda name, *a, real=real, **k: loaded.append(name) or real(
            name, *a, **k))
    return loaded


def _datasets_cache() -> Path:
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(os.environ.get("HF_DATASETS_CACHE") or Path(home) / "datasets")


def test_an_adapter_of_a_hub_task_is_refused_at_import_and_never_used(world, tmp_path, tasks_loaded):
    """Its task name is what an analysis loads data by: `hub:<a folder>` would read that folder."""
    elsewhere = tmp_path / "a-dataset-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.csv").write_text("text,label\nfine,good\n")
    entries = _of_task(world, f"hub:{elsewhere}")
    before = sorted(world.own().iterdir())
    message = refused(world, lambda: train_tab.upload(world.ctx, USER, [str(_zip(world, "hub-task", entries))]))
    assert message == "this workbench runs offline: adapters of hub tasks cannot be used here"
    assert sorted(world.own().iterdir()) == before
    for task in ("hub:imdb", "../x", "a\\b"):  # the hub by name, a path
        message = refused(world, lambda t=task: train_tab.upload(world.ctx, USER, [str(_zip(
            world, "hub-task", _of_task(world, t)))]))
        assert "runs offline" in message
    # One already in the user's folder (imported before this check, or copied there): never used.
    planted = world.own() / "hub-task-run" / "adapter"
    planted.mkdir(parents=True)
    for file, data in entries.items():
        (planted / file).write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        for endpoint in ("effective_rank", "trajectory_tsne", "forgetting", "route", "generate-composed", "generate",
                         "download"):
            message = refused(world, lambda e=endpoint: ENDPOINTS[e](world, USER, "hub-task-run"))
            assert message == "adapter 'hub-task-run' cannot be used: this workbench runs offline: adapters of " \
                              "hub tasks cannot be used here", (endpoint, message)
        note = main.refreshed(world.ctx, USER, False)[-1]
        assert "`hub-task-run`: this workbench runs offline" in note  # listed as skipped, and why
    finally:
        shutil.rmtree(planted.parent)
    assert tasks_loaded == []
    cache = _datasets_cache()
    assert not cache.is_dir() or not any(elsewhere.name in str(p) for p in cache.rglob("*"))


def test_an_adapter_of_an_uploaded_csv_is_used_but_not_scored_on_its_task(world, tasks_loaded):
    """Such an adapter's task is named after a file the workbench does not keep: one readable line
    wherever its task would be loaded; decoding with it works."""
    archive = _zip(world, "csv-task", _of_task(world, "my_reviews"))
    name = re.search(r"\*\*(.+)\*\*", train_tab.upload(world.ctx, USER, [str(archive)])).group(1)
    for endpoint in ("effective_rank", "trajectory_tsne", "route", "generate-composed"):
        message = refused(world, lambda e=endpoint: ENDPOINTS[e](world, USER, name))
        assert message.startswith(f"adapter {name!r} was trained on 'my_reviews', a CSV file the workbench "
                                  "does not keep; this needs adapters of one of: suite_sentiment"), message
    assert tasks_loaded == []
    page, _ = generate_tab.generate(world.ctx, USER, name, [], "is it good ?", "fine .", 2, 2, 0.0, 0)
    assert name in page
    # A CSV is never taken for a task the workbench loads itself, nor for a hub dataset.
    rows = "text,label\n" + "".join(f"review {i},{'good' if i % 2 else 'bad'}\n" for i in range(20))
    for file, task in (("reviews.csv", "reviews"), ("sst2.csv", "csv_sst2"), ("hub:imdb.csv", "csv_hub_imdb")):
        (world.uploads / file).write_text(rows)
        assert train_tab._task(world.ctx, "uploaded CSV", str(world.uploads / file), "text", "label", 0, 0).name == task


def test_a_hostile_folder_in_the_workspace_does_not_stop_the_app(world):
    for folder in (world.workspace / "shared" / "evil", world.own(OTHER) / "evil"):
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "adapter" / "adapter_config.json").write_text('{"format": "lora-diffusion-adapter"}')
    main.build(world.ctx.workspace, base=str(world.base), uploads=world.uploads)
    user, *lists, table, broken = main.session(world.ctx, USER, True)
    assert user == USER and world.good in lists[1]["choices"]
    assert "hostile-run" in broken and "shared:evil" in broken and str(world.root) not in broken
    status = list(train_tab.train(world.ctx, OTHER, **TRAIN, progress=NOOP))[-1][1]
    assert status.startswith("**done**")
    assert "evil" in main.refreshed(world.ctx, OTHER, False)[-1]
    assert main.session(world.ctx, "../not-an-id", False)[0] != "../not-an-id"  # a new id instead
    assert "adapter 'hostile-run' is broken" in refused(world, lambda: train_tab.download(world.ctx, USER,
                                                                                          "hostile-run"))


def test_limits_on_a_training_job(world):
    assert "steps must be between 1 and 5000" in refused(world, lambda: train_tab.train(
        world.ctx, USER, **dict(TRAIN, steps=5001), progress=NOOP))
    assert "batch size must be between 1 and 64" in refused(world, lambda: train_tab.train(
        world.ctx, USER, **dict(TRAIN, batch_size=65), progress=NOOP))
    assert "choose a task from the list" in refused(world, lambda: train_tab.train(
        world.ctx, USER, **dict(TRAIN, task_name="hub:someone/something"), progress=NOOP))
    rows = [f"review {i},{'good' if i % 2 else 'bad'}" for i in range(20_001)]
    (world.uploads / "rows.csv").write_text("\n".join(["text,label"] + rows) + "\n")
    assert "more than 20,000 rows" in refused(world, lambda: train_tab.train(
        world.ctx, USER, **dict(TRAIN, task_name="uploaded CSV", csv_file=str(world.uploads / "rows.csv")),
        progress=NOOP))
    (world.uploads / "rows.csv").write_text("\n".join(["text,label"] + rows[:5000]) + "\n")
    task = train_tab._task(world.ctx, "uploaded CSV", str(world.uploads / "rows.csv"), "text", "label", 0, 0)
    assert (len(task.train), len(task.eval)) == (4800, 200)  # 10% held out, capped at 200
    (world.uploads / "big.csv").write_bytes(b"text,label\n" + b"x,y\n" * (5 * 2**20))
    assert "larger than 20 MB" in refused(world, lambda: train_tab.train(
        world.ctx, USER, **dict(TRAIN, task_name="uploaded CSV", csv_file=str(world.uploads / "big.csv")),
        progress=NOOP))


# ---- the same through the HTTP API of the app ---------------------------------------------

@pytest.fixture(scope="module")
def app(world, tmp_path_factory):
    pytest.importorskip("gradio_client")
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(world.workspace, log, world.base) as url:
        yield url, log


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client
    return Client(app[0], verbose=False)


def _http_cases(world: World) -> list[tuple[str, dict]]:
    good, outside = world.good, str(world.good_run)
    return [
        ("/download", dict(user=USER, name="../x")),
        ("/download", dict(user=USER, name=outside)),
        ("/download", dict(user="/etc", name=good)),
        ("/download", dict(user=OTHER, name=good)),
        ("/generate", dict(user=USER, adapter_name="/etc/passwd", composed=[], instruction="is it good ?",
                           text="fine .", length=2, steps=2, temperature=0, seed=0)),
        ("/generate", dict(user=USER, adapter_name=BASE_ONLY, composed=[good, "../x"], instruction="is it ?",
                           text="fine .", length=2, steps=2, temperature=0, seed=0)),
        ("/effective_rank", dict(user=USER, names=["a/b"], examples=8, steps=2)),
        ("/trajectory_tsne", dict(user=USER, names=[good, ".."], examples=8, steps=2, projection="pca")),
        ("/forgetting", dict(user=USER, names=[outside], examples=8)),
        ("/route", dict(user=USER, names=[good, "../../outside"], instruction="is it good ?")),
        ("/show_results", dict(name="/etc/passwd")),
        ("/show_results", dict(name=str(world.outside / "compare.json"))),
        ("/show_scaling", dict(name="../results/analysis/scaling/scaling.json")),
        ("/train", dict(user="../x", **TRAIN)),
        ("/effective_rank", dict(user=OTHER, names=[good], examples=8, steps=2)),  # another user's adapter
        ("/train", dict(user=USER, **dict(TRAIN, steps=10**6))),
    ]


HTTP_UPLOADS = ["config-only-format", "tensors-of-another-shape", "entry-name-too-long", "many-entries",
                "entry-over-its-cap", "executable", "nested-dotdot"]


def test_the_http_api_refuses_names_paths_and_hostile_uploads_in_one_line(world, app, client):
    from gradio_client import handle_file
    for api_name, args in _http_cases(world):
        with pytest.raises(Exception) as error:
            client.predict(**args, api_name=api_name)
        readable(str(error.value), world)
    before = sorted(world.own().iterdir())
    hostile = _hostile(world)
    for case in HTTP_UPLOADS:
        entries, says = hostile[case]
        with pytest.raises(Exception) as error:
            client.predict(user=USER, files=[handle_file(str(_zip(world, f"http-{case}", entries)))],
                           api_name="/upload")
        assert says in readable(str(error.value), world)
    assert sorted(world.own().iterdir()) == before
    assert "Traceback" not in app[1].read_text(), app[1].read_text()[-5000:]


def test_stop_takes_a_queued_job_out_of_the_queue_and_ends_a_running_one(world, app):
    from gradio_client import Client
    first, second = Client(app[0], verbose=False), Client(app[0], verbose=False)
    running = first.submit(user=USER, **dict(TRAIN, steps=5000), api_name="/train")
    _wait_for(running, "running")
    queued = second.submit(user=OTHER, **TRAIN, api_name="/train")
    _wait_for(queued, "number 1 in the queue")
    assert second.predict(user=OTHER, api_name="/stop") == "stopped: the job leaves the queue without training"
    status, _, metric = queued.result(timeout=60)
    assert status.startswith("**stopped**") and metric == "stopped while queued: nothing was trained"
    assert first.predict(user=USER, api_name="/stop").startswith("stopping after the current step")
    status, _, metric = running.result(timeout=120)
    assert status.startswith("**stopped** after") and "the adapter is kept, not scored" in metric
    name = re.search(r"`([^`]+)`", status).group(1)
    assert read_json(world.own() / name / "stopped.json")["reason"] == "stopped by you"  # listed as stopped
    assert "Traceback" not in app[1].read_text(), app[1].read_text()[-5000:]


def _wait_for(job, text: str, seconds: float = 60) -> None:
    import time
    deadline = time.time() + seconds
    while time.time() < deadline:
        if any(text in str(o[0]) for o in job.outputs()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the job never showed {text!r}: {job.outputs()[-1:] or job.status()}")

