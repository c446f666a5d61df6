"""The Compare tab's handlers without a browser: the user's runs side by side, several adapters
answering one list of sentences at once, figures for download, a run exported as one file with its
curve; and the Generate tab taking its decoding from the chosen adapter."""

import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from test_mixed import KINDS, saved

from lora_diffusion import cli
from lora_diffusion.adapters import load_model
from lora_diffusion.analysis.trajectories import denoising_trajectory
from lora_diffusion.app import common, compare_tab, generate_tab, main, train_tab
from lora_diffusion.app.common import BASE_ONLY, Context
from lora_diffusion.files import read_json, read_jsonl, write_json
from lora_diffusion.router import Composition
from lora_diffusion.uploads import CURVE_FILE
from lora_diffusion.workspace import ROUTER, Workspace

USER = "compare-user-01"
NOOP = lambda *a, **k: None  # noqa: E731  (stands in for gr.Progress)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_base_dir):
    return Context(Workspace(tmp_path_factory.mktemp("ws")), base=str(tiny_base_dir))


def train_run(ctx, user, method, options):
    args = dict(task_name="suite_sentiment", csv_file=None, text_column="text", label_column="label", max_train=32,
                method=method, options=options, lr=0, steps=4, batch_size=4, seed=0)
    return list(train_tab.train(ctx, user, **args, progress=NOOP))[-1][0]


@pytest.fixture(scope="module")
def runs(ctx):
    """Two finished runs of the user (LoRA-Diffusion, weight LoRA) and a copy of one marked stopped."""
    names = [train_run(ctx, USER, "lora_diffusion", {"ranks": "4,2,2", "k": 1}), train_run(ctx, USER, "lora", {"r": 2})]
    root = ctx.workspace.user(USER).root
    shutil.copytree(root / names[1], root / "stopped-run", ignore=shutil.ignore_patterns("results.json"))
    write_json(root / "stopped-run" / "stopped.json", {"step": 2, "reason": "stopped by you"})
    return names


def refused(call) -> str:
    with pytest.raises(gr.Error) as error:
        call()
    message = error.value.message
    assert "\n" not in message and "Traceback" not in message and "/tmp" not in message, message
    return message


# ---- the user's runs ---------------------------------------------------------------------------------

def test_the_runs_table_lists_the_users_runs_side_by_side_with_their_charts(ctx, runs):
    choices, rows, scores, curves = compare_tab.show_runs(ctx, USER, False)
    by_name = {row[0]: dict(zip(compare_tab.RUN_HEADERS, row)) for row in rows}
    assert set(by_name) == {*runs, "stopped-run"}
    for name, method in zip(runs, ("lora_diffusion", "lora")):
        row, config = by_name[name], read_json(ctx.workspace.user(USER).adapter_path(name) / "adapter_config.json")
        results = read_json(ctx.workspace.user(USER).root / name / "results.json")
        assert (row["method"], row["task"], row["steps"], row["status"]) == (method, "suite_sentiment", 4, "done")
        assert row["trainable params"] == f"{config['accounting']['trainable_parameters']:,}"
        assert row["held-out score %"] == f"{100 * results['accuracy']:.1f}" and row["metric"] == "accuracy"
        assert float(row["train time (s)"]) == pytest.approx(results["train"]["train_seconds"], abs=0.05)
    stopped = by_name["stopped-run"]
    assert (stopped["steps"], stopped["status"], stopped["held-out score %"], stopped["metric"]) == (
        2, "stopped at step 2", "", "")
    # a bar per scored run, a colour per method; the stopped one is named in the title
    assert sorted(x for trace in scores.data for x in trace.x) == sorted(runs)
    assert {trace.name for trace in scores.data} == {"lora_diffusion", "lora"}
    assert "1 not scored" in scores.layout.title.text
    assert {trace.name for trace in curves.data} == {*runs, "stopped-run"}  # every run logged its loss
    assert choices["choices"][0] == BASE_ONLY and set(choices["choices"][1:]) == {*runs, "stopped-run"}
    # the page fills the same view with the adapter lists (main.refreshed), for this user only
    assert main.refreshed(ctx, USER, False)[6] == rows
    assert main.refreshed(ctx, "compare-other-01", False)[6] == []
    assert "user id" in refused(lambda: compare_tab.show_runs(ctx, "../x", False))


def test_an_exported_run_carries_its_curve_and_score_into_another_workbench(ctx, runs, tmp_path_factory, tiny_base_dir):
    archive = train_tab.download(ctx, USER, runs[0])
    with zipfile.ZipFile(archive) as z:
        assert {"adapter_config.json", "adapter.safetensors", "results.json", CURVE_FILE} <= set(z.namelist())
    other = Context(Workspace(tmp_path_factory.mktemp("other-ws")), base=str(tiny_base_dir))  # a neighbour's
    shutil.copy(archive, other.uploads / "run.zip")
    imported = train_tab.upload(other, "neighbour-01", [str(other.uploads / "run.zip")]).split("**")[1]
    mine = {r[0]: r for r in compare_tab.show_runs(ctx, USER, False)[1]}[runs[0]]
    theirs = compare_tab.show_runs(other, "neighbour-01", False)
    assert theirs[1][0][:8] == [imported] + mine[1:8] and theirs[1][0][8] == "imported"
    assert list(theirs[3].data[0].y) == [r["loss"] for r in read_jsonl(
        ctx.workspace.user(USER).root / runs[0] / CURVE_FILE) if "loss" in r]
    # a curve that is not a step's numbers is refused, and nothing is left behind
    with zipfile.ZipFile(archive) as z, zipfile.ZipFile(other.uploads / "bad.zip", "w") as bad:
        for entry in z.namelist():
            bad.writestr(entry, z.read(entry) if entry != CURVE_FILE else b'{"step": 1, "loss": "high"}\n')
    before = sorted(other.workspace.root.rglob("*"))
    assert refused(lambda: train_tab.upload(other, "neighbour-01", [str(other.uploads / "bad.zip")])) == \
        f"{CURVE_FILE} line 1 is not a step's numbers"
    assert sorted(other.workspace.root.rglob("*")) == before


# ---- several adapters at once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distinct(ctx, tmp_path_factory):
    """Adapters of four kinds that answer differently (random, not zero: see test_mixed), a bitfit one
    (decoded alone), and a saved router over the two LoRA-Diffusion ones, in a user's workspace."""
    user = "compare-mixed-01"
    root, made = ctx.workspace.user(user).root, tmp_path_factory.mktemp("made")
    names = []
    for i, (method, options) in enumerate(KINDS + [("bitfit", {})]):
        names.append(f"run-{i}-{method}")
        shutil.copytree(saved(made, i, method, options), root / names[-1] / "adapter")
    composition = Composition.from_adapters([root / n / "adapter" for n in names[:2]], base=ctx.base)
    composition.save(root / "compositions" / "abc123-150")
    return user, names


def test_several_adapters_answer_each_sentence_as_each_answers_alone(ctx, distinct):
    user, names = distinct
    router = ROUTER + "abc123-150"
    assert ctx.workspace.user(user).routers() == {router: "router over suite_topic, suite_topic"}
    sentences = compare_tab.SENTENCES[:3]
    table = compare_tab.several_adapters(ctx, user, [BASE_ONLY] + names + [router], "\n".join(sentences), "", 0,
                                         progress=NOOP)
    assert table["headers"] == ["sentence", "base"] + names + ["router over suite_topic, suite_topic"]
    assert [row[0] for row in table["data"]] == sentences
    ws = ctx.workspace.user(user)
    instruction = read_json(ws.adapter_path(names[0]) / "adapter_config.json")["task"]["instruction"]
    models = ([load_model(base=ctx.base)[0]] + [load_model(ws.adapter_path(n), base=ctx.base)[0] for n in names]
              + [ws.router(router, base=ctx.base).model])
    for k, model in enumerate(models):  # what each column gives alone, as the Generate tab decodes it
        alone = [denoising_trajectory(model, instruction, s, 2, 2)["answer"] for s in sentences]
        assert [row[k + 1] for row in table["data"]] == alone, table["headers"][k + 1]
    assert len({tuple(row[k] for row in table["data"]) for k in range(2, 6)}) > 1  # the adapters differ
    # a typed instruction is read by every column
    typed = compare_tab.several_adapters(ctx, user, names[2:4], sentences[0], "what is it about ?", 3, progress=NOOP)
    model = load_model(ws.adapter_path(names[3]), base=ctx.base)[0]
    assert typed["data"][0][2] == denoising_trajectory(model, "what is it about ?", sentences[0], 3, 3)["answer"]


def test_several_adapters_refuse_in_one_readable_line(ctx, distinct):
    user, names = distinct
    run = lambda picked, text="a fine film .", instruction="", length=0: compare_tab.several_adapters(  # noqa: E731
        ctx, user, picked, text, instruction, length, progress=NOOP)
    assert refused(lambda: run([])) == "pick one or more adapters first (train one in the Train tab)"
    assert "not a valid adapter name" in refused(lambda: run(["../x"]))
    assert "no adapter named" in refused(lambda: run(["someone-elses"]))
    assert refused(lambda: run([names[0], ROUTER + "nope"])) == \
        "no such router in your workspace: pick one from the list"
    assert refused(lambda: run(names[:1], "\n".join(["a film ."] * 33))) == \
        "33 sentences: at most 32 are answered at once"
    assert refused(lambda: run(names[:1], "\n \n")) == "type one or more sentences, one per line"
    assert refused(lambda: run([BASE_ONLY])) == "type an instruction: the base model has no task of its own"
    assert refused(lambda: run(names[:1], length=99)) == "the response length must be between 0 and 32"
    assert "user id" in refused(lambda: compare_tab.several_adapters(ctx, "..", names[:1], "a", "", 0, progress=NOOP))
    # an adapter of another base (its config names another fingerprint), in a mixed batch or decoded alone
    root = ctx.workspace.user(user).root
    for source, copy in ((names[2], "other-base-lora"), (names[4], "other-base-bitfit")):
        shutil.copytree(root / source, root / copy)
        config = read_json(root / copy / "adapter" / "adapter_config.json")
        config["base"]["fingerprint"] = "0" * len(config["base"]["fingerprint"])
        write_json(root / copy / "adapter" / "adapter_config.json", config)
    for picked in (["other-base-lora"], [names[3], "other-base-lora"], [names[3], "other-base-bitfit"]):
        assert "was trained on a base with fingerprint 0000" in refused(lambda: run(picked))


# ---- figures for download ---------------------------------------------------------------------------------

def test_a_tabs_figures_download_as_html_pages(ctx, runs):
    _, _, scores, curves = compare_tab.show_runs(ctx, USER, False)
    shown = [gr.Plot().postprocess(scores), None, gr.Plot().postprocess(curves)]  # one plot not drawn yet
    files, note = common.download_figures(ctx, ("runs-score", "methods", "runs-loss"), USER, *shown)
    html = [Path(f) for f in files if f.endswith(".html")]
    assert [f.name.split("-", 2)[2] for f in html] == ["runs-score.html", "runs-loss.html"]  # after the time stamp
    assert all(f.read_text().startswith("<!doctype html>") and "Plotly.newPlot" in f.read_text() for f in html)
    assert "Held-out score per run" in html[0].read_text() and "Training loss per run" in html[1].read_text()
    assert all(f.parent.parent == ctx.workspace.user(USER).exports() for f in html)  # the user's, served by gradio
    if not common.png_available():  # the button says so; no PNG is promised
        assert files == [str(f) for f in html] and note == "" and "PNG needs" in common.explain.FIGURES_BUTTON_HTML_ONLY
    assert refused(lambda: common.download_figures(ctx, ("a",), USER, None)) == \
        "no figure to download yet: make one first"
    assert refused(lambda: common.download_figures(ctx, ("a",), USER, {"type": "plotly", "plot": "nope"})).startswith(
        "that is not a figure of this page")
    assert refused(lambda: common.download_figures(ctx, ("a",), USER, {"type": "matplotlib", "plot": "x"})) == \
        "that is not a figure of this page"
    assert "user id" in refused(lambda: common.download_figures(ctx, ("a",), "/etc", shown[0]))


def _inside(node: dict) -> set:
    return {node["id"]} | {i for child in node.get("children", []) for i in _inside(child)}


def test_every_tab_offers_its_figures_for_download(tmp_path):
    config = main.build(Workspace(tmp_path / "ws")).config
    components = {c["id"]: c for c in config["components"]}
    tabs = {}

    def walk(node):
        if components.get(node["id"], {}).get("type") == "tabitem":
            tabs[components[node["id"]]["props"]["label"]] = _inside(node)
        for child in node.get("children", []):
            walk(child)

    walk(config["layout"])
    plots = {c["id"] for c in components.values() if c["type"] == "plot"
             and any(c["id"] in tabs[tab] for tab in ("Train", "Generate", "Analyse", "Compare"))}
    assert len(plots) == 10
    offered = set()
    for dep in config["dependencies"]:
        if (dep.get("api_name") or "").startswith("download_figures_"):
            offered |= set(dep["inputs"]) & plots
            label = components[dep["targets"][0][0]]["props"]["value"]
            assert label in (common.explain.FIGURES_BUTTON, common.explain.FIGURES_BUTTON_HTML_ONLY)
    assert offered == plots


# ---- the Generate tab takes its decoding from the adapter --------------------------------------------------

def test_picking_an_adapter_sets_generates_length_steps_and_instruction(ctx, runs):
    length, steps, instruction = generate_tab.decoding_of(ctx, USER, runs[0])
    assert (length["value"], steps["value"]) == (2, 2)  # suite_sentiment: a label word and [SEP]; scored with 8
    assert instruction["value"] == read_json(
        ctx.workspace.user(USER).adapter_path(runs[0]) / "adapter_config.json")["task"]["instruction"]
    assert ctx.workspace.user(USER).decoding("stopped-run")["sampler_steps"] == 2  # never scored: the length
    for name in (BASE_ONLY, "../escape", None):  # the base, or a refused name: nothing changes, nothing is read
        assert all("value" not in update for update in generate_tab.decoding_of(ctx, USER, name))


# ---- lora-diffusion app --data-dir ---------------------------------------------------------------------------

def test_the_app_command_serves_the_data_folder_it_is_given(monkeypatch, tmp_path, tiny_base_dir):
    built = {}
    build = main.build
    monkeypatch.setattr(main, "build", lambda *a, **k: built.update(args=a) or build(*a, **k))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    assert cli.main(["app", "--workspace", str(tmp_path / "ws"), "--data-dir", str(tmp_path / "data"),
                     "--base", str(tiny_base_dir)]) in (0, None)
    assert built["args"][1] == str(tmp_path / "data")
