"""The app's handlers called directly, without a browser or a server (they are module-level functions)."""

import inspect
import os
import re
import shutil
import time
from pathlib import Path

import gradio as gr
import pytest

from lora_diffusion import uploads, workspace
from lora_diffusion.app import analyse_tab, common, compare_tab, explain, generate_tab, main, train_tab
from lora_diffusion.app.common import Context
from lora_diffusion.data import load_task
from lora_diffusion.methods import METHODS, describe, method_config, option_specs
from lora_diffusion.paths import CHECKOUT
from lora_diffusion.plots import MAX_FIGURE_JSON
from lora_diffusion.training import TrainConfig
from lora_diffusion.workspace import JobLimits, Workspace


def defaults_of_every_control() -> list:
    """What the Train tab's option controls hold before anyone touches them."""
    return [train_tab.option_control(spec).value for _, spec in train_tab.OPTION_LAYOUT]


@pytest.mark.parametrize("method", list(METHODS))
def test_option_controls_are_generated_from_the_config_and_read_back_as_its_defaults(method):
    options = train_tab.collect_options(method, *defaults_of_every_control())
    assert list(options) == [s.name for s in option_specs(method)]
    assert method_config(method, options) == method_config(method)


def test_only_the_chosen_methods_options_are_shown_and_collected():
    values = defaults_of_every_control()
    r_index = [i for i, (m, s) in enumerate(train_tab.OPTION_LAYOUT) if (m, s.name) == ("lora", "r")][0]
    values[r_index] = 4
    assert train_tab.collect_options("lora", *values)["r"] == 4
    assert "r" not in train_tab.collect_options("lora_diffusion", *values)
    shown = train_tab.show_options("dora")
    assert [u["visible"] for u in shown] == [m == "dora" for m in METHODS]


USER = "handlers-user-01"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_base_dir):
    return Context(Workspace(tmp_path_factory.mktemp("ws")), base=str(tiny_base_dir))


def train_run(ctx, user=USER, **changes):
    args = dict(task_name="suite_sentiment", csv_file=None, text_column="text", label_column="label", max_train=32,
                method="lora_diffusion", options={"ranks": "4,2,2", "k": 1}, lr=0, steps=4, batch_size=4, seed=0)
    args.update(changes)
    return list(train_tab.train(ctx, user, **args, progress=lambda *a, **k: None))


def test_train_streams_until_the_run_is_done_and_lists_its_adapter_for_its_user_only(ctx):
    updates = train_run(ctx)
    job_id, status, figure, metric = updates[-1]
    assert status.startswith("**done** after 4 steps") and "(generative)" in metric
    assert [u[0] for u in updates] == [job_id] * len(updates)  # one job, reported throughout
    *lists, table, broken = main.refreshed(ctx, USER, False)
    assert table[0][:3] == [job_id, "done", "lora_diffusion"] and broken == ""
    assert job_id in lists[1]["choices"]
    assert main.refreshed(ctx, "another-user-01", False)[-2] == []  # each user sees their own adapters


def test_a_button_pressed_before_the_page_has_its_user_is_told_to_press_again(ctx):
    # The user id comes from the page's opening event; a click can beat it (seen on the shipped base).
    with pytest.raises(gr.Error, match="the page has not finished opening"):
        train_run(ctx, user=None)


def test_a_user_sees_shared_adapters_only_when_asked(ctx):
    if not ctx.workspace.user(USER).adapters():
        train_run(ctx)
    own = ctx.workspace.user(USER).adapters()[0]["name"]
    shutil.copytree(ctx.workspace.root / "users" / USER / own, ctx.workspace.root / "shared" / "team-adapter")
    other = "another-user-02"
    assert main.refreshed(ctx, other, False)[1]["choices"] == []
    assert main.refreshed(ctx, other, True)[1]["choices"] == ["shared:team-adapter"]
    page, _ = generate_tab.generate(ctx, other, "shared:team-adapter", [], "is it good ?", "fine .", 2, 2, 0.0, 0)
    assert "shared:team-adapter" in page


NOOP = lambda *a, **k: None  # noqa: E731  (stands in for gr.Progress)


def test_a_page_that_opens_or_reloads_gets_the_lists_and_follows_the_job_still_training(ctx):
    user = "handlers-reload-01"
    done_id = train_run(ctx, user=user)[-1][0]
    assert list(train_tab.follow(ctx, user, progress=NOOP)) == [gr.skip()]  # nothing training: nothing changes
    _, _, pick, *_, table, _ = main.session(ctx, user, False)  # the page (re)opens: lists filled at once
    assert pick["choices"] == [done_id] and table[0][:2] == [done_id, "done"]
    job = ctx.workspace.user(user).start_training(load_task("suite_topic", max_train=16, max_eval=4), "bitfit", {},
                                                  TrainConfig(steps=5000, batch_size=2, log_every=1),
                                                  base=ctx.base, sampler_steps=1)
    followed = train_tab.follow(ctx, user, progress=NOOP)  # the reloaded page follows it, and can stop it
    assert next(followed)[0] == job.id
    while job.step < 1:
        time.sleep(0.05)
    assert train_tab.stop(ctx, user, job.id) == "stopping after the current step; the adapter is kept but not scored"
    job_id, status, _, metric = list(followed)[-1]
    assert job_id == job.id and status.startswith("**stopped** after")
    step = job.stopped["step"]
    assert metric == f"stopped by you at step {step}: the adapter is kept, not scored on the held-out split"
    _, pick, *_, table, _ = main.refreshed(ctx, user, False)
    assert pick["choices"] == [job.id, done_id]
    assert table[0][:2] == [job.id, f"stopped at step {step}"] and table[0][4:6] == ["", ""]


def test_the_page_fills_the_adapter_lists_on_load_and_after_every_change(ctx):
    config = main.build(ctx.workspace, base=ctx.base).config
    table = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "adapters-table")
    deps = {d["id"]: d for d in config["dependencies"]}
    fill = [d for d in deps.values() if table in d["outputs"]]
    assert any(t[1] == "load" for d in fill for t in d["targets"])
    # every adapter dropdown of every tab, Compare's runs (its column list, table and two charts), the table,
    # the skipped folders
    lists = fill[0]["outputs"][-11:]
    assert all(d["outputs"][-11:] == lists for d in fill)
    refreshed_after = {deps[d["trigger_after"]]["api_name"] for d in fill if d["trigger_after"] is not None}
    assert {"train", "upload", "delete", "reset"} <= refreshed_after  # a job's end (done or stopped) ends train


def test_delete_and_reset_from_the_page_and_an_import_keeps_its_score(ctx):
    user = "handlers-delete-01"
    first, second = train_run(ctx, user=user)[-1][0], train_run(ctx, user=user)[-1][0]
    archive = ctx.uploads / "exported.zip"
    shutil.copy(train_tab.download(ctx, user, first), archive)
    imported = re.search(r"\*\*(.+)\*\*", train_tab.upload(ctx, user, [str(archive)])).group(1)
    rows = {r[0]: r for r in main.refreshed(ctx, user, False)[-2]}
    assert rows[imported][1] == "imported" and rows[imported][4:6] == rows[first][4:6] != ["", ""]
    assert train_tab.delete(ctx, user, first) == (f"deleted **{first}**", None)  # and the picker is emptied
    assert [r[0] for r in main.refreshed(ctx, user, False)[-2]] == [imported, second]
    with pytest.raises(gr.Error, match="no adapter named"):
        train_tab.delete(ctx, user, first)
    with pytest.raises(gr.Error, match="tick 'yes, delete everything of mine' first"):
        train_tab.reset(ctx, user, False)
    assert len(main.refreshed(ctx, user, False)[-2]) == 2  # nothing deleted
    assert train_tab.reset(ctx, user, True) == ("deleted all your runs and adapters (2)", False)
    assert main.refreshed(ctx, user, False)[-2] == [] and main.refreshed(ctx, USER, False)[-2] != []


def test_a_bad_option_is_one_readable_line(ctx):
    with pytest.raises(gr.Error) as error:
        train_run(ctx, options={"ranks": "64,32"})
    assert "method 'lora_diffusion' option 'ranks' must be none, or 3 comma-separated values" in str(error.value)
    with pytest.raises(gr.Error, match="has no option 'rank'"):
        train_run(ctx, method="lora", options={"rank": 4})


def test_generate_decodes_with_the_base_and_the_adapter(ctx):
    if not ctx.workspace.user(USER).adapters():
        train_run(ctx)
    name = ctx.workspace.user(USER).adapters()[0]["name"]
    page, figure = generate_tab.generate(ctx, USER, name, [], "is it good ?", "a great film .", 2, 2, 0.0, 0)
    assert page.count("<h4>") == 2 and "step 2" in page and name in page
    # The default LoRA-Diffusion (blocks) adds no step delta after the body: the plot says so.
    assert len(figure.data) == 0 and "No δ_t to show" in figure.layout.annotations[0].text
    # Picking the adapter sets the response length it was trained with (suite_sentiment: 2), and steps and
    # instruction (tests/test_app_compare.py).
    assert generate_tab.decoding_of(ctx, USER, name)[0]["value"] == 2
    assert "value" not in generate_tab.decoding_of(ctx, USER, common.BASE_ONLY)[0]
    assert "value" not in generate_tab.decoding_of(ctx, USER, "../escape")[0]  # refused, nothing read


@pytest.mark.skipif(CHECKOUT is None or not (CHECKOUT / "results" / "compare_sst2.json").is_file(),
                    reason="needs the checkout's results/")
def test_compare_reads_a_results_file_of_the_checkout(ctx):
    table, figure = compare_tab.show_results(ctx, "results/compare_sst2.json")
    assert "| lora_diffusion |" in table and len(figure.data[0].x) == 7
    with pytest.raises(gr.Error, match="not a results file of this workbench; choose one from the list"):
        compare_tab.show_results(ctx, "no/such/results.json")
    with pytest.raises(gr.Error, match="not a results file of this workbench"):
        compare_tab.show_scaling(ctx, "results/compare_sst2.json")  # a results file, of the other kind


def test_the_app_is_offline_cleans_its_cache_and_caps_uploads_by_the_library(monkeypatch, tmp_path, tiny_base_dir):
    assert os.environ.get("HF_HUB_OFFLINE") and os.environ.get("HF_DATASETS_OFFLINE")  # set when main is imported
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, delete_cache=self.delete_cache))
    main.serve(str(tmp_path / "ws"), base=str(tiny_base_dir))
    assert launched["max_file_size"] == uploads.MAX_UPLOAD_BYTES
    assert launched["delete_cache"] == (main.CACHE_SECONDS, main.CACHE_SECONDS)
    assert launched["css"] == main.PAGE_CSS  # a refusal does not cover the outputs (tests/test_app.py checks the page)


def _readme_limits() -> dict:
    readme = Path(main.__file__).with_name("README.md")
    if not readme.is_file():
        pytest.skip("the app's README is not beside it (an installed package)")
    section = readme.read_text().split("## Limits", 1)[1]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ")]
    return {label.strip(): value.strip() for label, value in rows[1:]}  # after the header row


def test_the_readmes_limits_table_is_the_codes():
    limits = JobLimits()
    assert main.CACHE_SECONDS == workspace.EXPORT_HOURS * 3600 == 3600
    assert _readme_limits() == {
        "training steps per job": f"{limits.steps:,}",
        "batch size": str(limits.batch_size),
        "training time per job": f"{limits.seconds / 60:g} minutes",
        "jobs queued or running per user": str(limits.jobs_per_user),
        "jobs waiting, all users together": str(limits.waiting),
        "jobs training at once": str(inspect.signature(Workspace).parameters["max_running"].default),
        "adapter upload, unpacked, in all": f"{uploads.MAX_UPLOAD_BYTES // 2**20} MB",
        "a JSON file in an adapter upload": f"{uploads.MAX_JSON_BYTES // 2**20} MB",
        "entries of an adapter zip": str(uploads.MAX_ENTRIES),
        "uploaded CSV": f"{train_tab.MAX_CSV_BYTES // 2**20} MB",
        "rows of an uploaded CSV": f"{train_tab.MAX_CSV_ROWS:,}",
        "rows of it held out": str(train_tab.CSV_HELD_OUT),
        "an adapter name, user id or job id": f"{workspace.MAX_NAME} characters",
        "a user id, at least": f"{workspace.MIN_USER_ID} characters",
        "text typed into a page": f"{common.MAX_TEXT:,} characters",
        "routers kept in memory, all users together": str(workspace.Compositions().size),
        "a results file Compare reads": f"{compare_tab.MAX_RESULTS_BYTES // 2**20} MB",
        "sentences answered by several adapters at once": str(compare_tab.MAX_SENTENCES),
        "a figure sent back for download": f"{MAX_FIGURE_JSON // 2**20} MB of JSON",
        "uploads, download zips and figures kept": "1 hour",
    }


# ---- Explanations where the user looks: notes beside every plot, a tooltip on every control, a glossary ----

INPUT_TYPES = ("slider", "dropdown", "textbox", "checkbox", "checkboxgroup", "number", "radio")  # take info=


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The built page as gradio serialises it: components by id, each block's children and parent."""
    config = main.build(Workspace(tmp_path_factory.mktemp("page"))).config
    children, parent = {}, {}

    def walk(node):
        children[node["id"]] = [child["id"] for child in node.get("children", [])]
        for child in node.get("children", []):
            parent[child["id"]] = node["id"]
            walk(child)

    walk(config["layout"])
    components = {c["id"]: c for c in config["components"]}
    return {"components": components, "children": children, "parent": parent, "dependencies": config["dependencies"]}


def _of_type(page, kind: str) -> list[dict]:
    return [c for c in page["components"].values() if c["type"] == kind]


def _descendants(page, block_id) -> list[dict]:
    found = []
    for child in page["children"].get(block_id, []):
        found += [page["components"][child]] + _descendants(page, child)
    return found


def _by_label(page, kind: str, label: str) -> dict:
    return next(c for c in _of_type(page, kind) if c["props"].get("label") == label)


def test_every_control_has_a_tooltip_from_one_place_and_the_glossary_lists_it(page):
    app_knobs = {(label, info) for knobs in explain.KNOBS.values() for label, info in knobs.items()}
    method_options = {(spec.name, describe(spec)) for _, spec in train_tab.OPTION_LAYOUT}
    controls = [c for c in page["components"].values() if c["type"] in INPUT_TYPES]
    shown = {(c["props"]["label"], c["props"].get("info")) for c in controls}
    assert len(controls) > len(train_tab.OPTION_LAYOUT) + 20
    assert all(c["props"].get("info") for c in controls)
    assert shown <= app_knobs | method_options  # no tooltip written anywhere else
    assert method_options <= shown  # every option control carries its config's help
    assert app_knobs <= shown  # and no glossary entry is stale
    glossary = explain.glossary()
    assert all(f"| {label} | {info} |" in glossary for label, info in app_knobs)
    page_glossary = _by_label(page, "accordion", "Glossary: every knob of the page")
    assert _descendants(page, page_glossary["id"])[0]["props"]["value"] == glossary


@pytest.mark.parametrize("method", list(METHODS))
def test_the_glossary_lists_every_option_of_every_method_from_its_config(method):
    section = explain.glossary().split(f"#### `{method}`\n\n", 1)[1].split("####", 1)[0]
    assert section.startswith(explain.method_summary(method))
    assert f"Default learning rate: {METHODS[method].Config().default_lr():g}." in section
    specs = option_specs(method)
    assert [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")] == [s.name for s in specs]
    assert all(f"| `{s.name}` | {describe(s)} |" in section for s in specs)
    assert specs or "No options." in section


def test_every_tab_and_every_plot_has_a_closed_note_beside_it(page):
    notes = [v for v in vars(explain).values() if isinstance(v, explain.Note)]
    placed = {c["props"]["label"]: c for c in _of_type(page, "accordion")}
    assert {n.title for n in notes} <= set(placed)  # every note is on the page
    for note in notes:
        assert note.what and note.read and note.next
        text = _descendants(page, placed[note.title]["id"])[0]["props"]["value"]
        assert text == note.markdown() and "What am I looking at?" in text and "What to try next." in text
    assert not any(c["props"]["open"] for c in placed.values())  # closed until asked
    for tab in _of_type(page, "tabitem"):
        first = page["components"][page["children"][tab["id"]][0]]
        assert first["type"] == "accordion" and first["props"]["label"] == f"About this tab: {tab['props']['label']}"
    plots = _of_type(page, "plot")
    # loss; perturbation norm; analysis, trajectories, router; runs x2, methods, scaling x2; the lesson's 4
    assert len(plots) == 14
    for plot in plots:
        holder = page["components"][page["parent"][plot["id"]]]
        assert holder["type"] in ("row", "column")  # the plot's own box, not the whole tab
        beside = [c for c in _descendants(page, holder["id"]) if c["type"] == "accordion"]
        assert beside and all(not b["props"]["label"].startswith("About this tab") for b in beside)


def _outputs_of_change(page, component) -> list[dict]:
    dep = next(d for d in page["dependencies"] if [component["id"], "change"] in [list(t) for t in d["targets"]])
    return [page["components"][o] for o in dep["outputs"]]


def test_method_options_and_the_csv_upload_are_shown_only_when_they_apply(page):
    method = next(c for c in _of_type(page, "dropdown") if c["props"].get("elem_id") == "train-method")
    groups = _outputs_of_change(page, method)
    assert len(groups) == len(METHODS)
    for name, group in zip(METHODS, groups):  # each group holds its method's options, shown for the default only
        labels = [c["props"].get("label") for c in _descendants(page, group["id"]) if c["type"] in INPUT_TYPES]
        assert labels == [s.name for s in option_specs(name)]
        assert group["props"]["visible"] is (name == method["props"]["value"] == "lora_diffusion")
    for name in METHODS:
        assert [u["visible"] for u in train_tab.show_options(name)] == [m == name for m in METHODS]

    task = _by_label(page, "dropdown", "task")
    (csv_group,) = _outputs_of_change(page, task)
    inside = {c["type"]: c for c in _descendants(page, csv_group["id"])}
    assert "file" in inside and csv_group["props"]["visible"] is False  # the default task needs no file
    assert task["props"]["value"] == "suite_sentiment"
    for name in train_tab.TASKS:
        assert train_tab.show_csv(name)["visible"] is (name == train_tab.CSV_TASK)


def test_an_analysis_says_when_the_answers_are_too_short_for_a_trajectory():
    assert analyse_tab.steps_note({"suite_struct": 8}, 8) == ""  # every step asked was taken
    short = analyse_tab.steps_note({"suite_sentiment": 2}, 8)
    assert "suite_sentiment 2" in short and "suite_struct" in short
    mixed = analyse_tab.steps_note({"suite_struct": 12, "suite_sentiment": 2}, 16)
    assert "suite_struct 12, suite_sentiment 2" in mixed and "Too few" not in mixed


def test_effective_rank_and_tsne_of_a_sentiment_adapter_point_to_longer_answers(ctx):
    if not ctx.workspace.user(USER).adapters():
        train_run(ctx)
    name = ctx.workspace.user(USER).adapters()[0]["name"]  # suite_sentiment: a label word and [SEP]
    note, figure, _ = analyse_tab.effective_rank(ctx, USER, [name], 8, 8, progress=NOOP)
    assert note.startswith("Effective rank") and len(figure.data[0].x) == 2
    assert "suite_sentiment 2" in note and "suite_struct" in note
    note, _, _ = analyse_tab.trajectory_tsne(ctx, USER, [name], 8, 8, "pca", progress=NOOP)
    assert note.startswith("trustworthiness") and "suite_sentiment 2" in note


def test_following_a_run_resends_its_figure_only_when_it_logged_something_new(monkeypatch):
    """A plot redrawn every second costs the browser CPU that training on the same laptop needs."""

    class Job:  # the parts of a TrainJob that following it reads
        id, spec, status, result, stopped, note, step = "run-1", {"steps": 4, "method": "lora", "task": "t",
                                                               "n_train": 8, "n_eval": 2}, "running", None, None, "", 0
        records, ticks = [], 0

        @property
        def finished(self):
            return self.ticks >= 3

        def monitor(self):
            return []

    job = Job()

    def one_second(seconds):  # the run logs one record in second 2 and ends in second 3
        job.ticks += 1
        if job.ticks == 2:
            job.records.append({"step": 1, "loss": 1.0})

    monkeypatch.setattr(train_tab.time, "sleep", one_second)
    updates = list(train_tab._follow(job, lambda *a, **k: None))
    resent = [hasattr(u[2], "to_dict") for u in updates]
    assert resent == [True, False, True, False, True]  # first view, nothing new, a record, nothing new, the end
    assert updates[1][2] == gr.skip() and updates[1][3] == gr.skip() and "running" in updates[1][1]
    assert len(updates[2][2].data[0].x) == 1 and all(u[0] == "run-1" for u in updates)
