"""The Lesson tab's handlers called directly, on the tiny random base (no browser, no server).

Every step runs through the handlers the page calls; each reveal must report what the library
measures for the runs in the workspace, compare it with the prediction locked in at Run, and
every refusal must be one readable line.
"""

import re
import time
from pathlib import Path

import gradio as gr
import pytest

from lora_diffusion.app import explain, lesson_tab, main, train_tab
from lora_diffusion.adapters import read_adapter_config
from lora_diffusion.app.common import Context
from lora_diffusion.data import SENTIMENT_INSTRUCTION, load_task
from lora_diffusion.files import read_json
from lora_diffusion.plots import png_available
from lora_diffusion.workspace import Workspace

USER = "lesson-user-0001"
NOOP = lambda *a, **k: None  # noqa: E731  (stands in for gr.Progress)
# The tiny base learns nothing in a few steps: the runs are the lesson's, only shorter.
SHORT = dict(max_train=32, steps=4, batch_size=4)
SHIPPED_RUN = dict(lesson_tab.RUN)  # before `short_runs` shortens it


def small_data_folder(folder: Path) -> Path:
    """The generic held-out text forgetting scores, a few hundred words of each source (the real files take
    seconds to tokenise)."""
    words = "the little dog ran to the park and saw a red ball near the old tree . it was happy ."
    for source, name in (("tinystories", "TinyStories-valid_head_sample.txt"), ("wikitext2", "test.txt")):
        (folder / source).mkdir(parents=True)
        (folder / source / name).write_text("\n".join(f"{words} {i}" for i in range(200)) + "\n")
    return folder


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_base_dir):
    return Context(Workspace(tmp_path_factory.mktemp("lesson")), base=str(tiny_base_dir),
                   data_dir=str(small_data_folder(tmp_path_factory.mktemp("data"))))


def spy(monkeypatch, name: str) -> list:
    """Record what the library function `lesson_tab.<name>` returned (and how it was called) for the lesson."""
    calls, real = [], getattr(lesson_tab, name)

    def recorded(*args, **kwargs):
        calls.append({"args": args, "kwargs": kwargs, "result": real(*args, **kwargs)})
        return calls[-1]["result"]
    monkeypatch.setattr(lesson_tab, name, recorded)
    return calls


@pytest.fixture(scope="module", autouse=True)
def short_runs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lesson_tab, "RUN", dict(lesson_tab.RUN, **SHORT))
        yield


def refused(call) -> str:
    """The one readable line a handler call is refused with (a generator is run to its end)."""
    with pytest.raises(gr.Error) as error:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    message = error.value.message
    assert message.strip() and "\n" not in message and "Traceback" not in message, message
    return message


def run_step(ctx, lesson, step, prediction, user=USER):
    """A training step to its end: (the lesson it wrote, and the last status, figure, metric it streamed)."""
    updates = list(lesson_tab.train(ctx, user, lesson, step, prediction, progress=NOOP))
    assert all(u[0] == gr.skip() for u in updates[1:])  # the state is written once, as the run starts
    return (updates[0][0], *updates[-1][1:])


@pytest.fixture(scope="module")
def trained(ctx):
    """A lesson with steps 1 and 2 run: the predictions made before each run, and what the runs streamed."""
    lesson = lesson_tab.new_lesson()
    lesson, status1, figure1, metric1 = run_step(ctx, lesson, 1, lesson_tab.CHOICES[1][2])
    lesson, status2, figure2, metric2 = run_step(ctx, lesson, 2, lesson_tab.CHOICES[2][1])
    return {"lesson": lesson, "status": (status1, status2), "figure": (figure1, figure2), "metric": (metric1, metric2)}


def results(ctx, name, user=USER) -> dict:
    """What the run wrote as its held-out results (the library's numbers)."""
    return read_json(ctx.workspace.user(user).root / name / "results.json")


def test_steps_1_and_2_train_the_default_run_then_weight_lora_on_the_same_budget(ctx, trained):
    lesson = trained["lesson"]
    assert all(s.startswith("**done** after 4 steps") for s in trained["status"])
    assert all("(generative)" in m for m in trained["metric"])  # the Train tab's score line
    ws = ctx.workspace.user(USER)
    ld, lora = (ws.jobs[lesson["runs"][step]].spec for step in (1, 2))
    assert ld["method"] == train_tab.DEFAULT_RUN["method"]
    assert (lora["method"], lora["options"]["r"]) == ("lora", 16)
    budget = ("task", "steps", "batch_size", "seed", "n_train", "n_eval")
    assert [ld[k] for k in budget] == [lora[k] for k in budget] == ["suite_sentiment", 4, 4, 0, 32, ld["n_eval"]]
    assert lesson["predictions"] == {1: lesson_tab.CHOICES[1][2], 2: lesson_tab.CHOICES[2][1]}
    assert all(len(figure.data) >= 2 for figure in trained["figure"])  # the loss and the held-out monitor


def test_the_lessons_runs_are_the_train_tabs_default_and_weight_lora_r16():
    assert SHIPPED_RUN == dict(train_tab.DEFAULT_RUN, csv_file=None, text_column="text", label_column="label")
    assert lesson_tab.TRAINED == {1: (train_tab.DEFAULT_RUN["method"], {}), 2: ("lora", {"r": 16})}


def test_reveals_1_and_2_report_the_scores_the_runs_wrote_and_judge_the_predictions(ctx, trained):
    lesson = trained["lesson"]
    ld, lora = (100 * results(ctx, lesson["runs"][step])["accuracy"] for step in (1, 2))
    first = lesson_tab.reveal(ctx, USER, lesson, 1)
    assert f"held-out accuracy **{ld:.1f}%**" in first and lesson["runs"][1] in first
    band = lesson_tab.band(ld)
    assert f"*{band}*" in first
    assert ("✓ your prediction matched" in first) == (band == lesson_tab.CHOICES[1][2])
    second = lesson_tab.reveal(ctx, USER, lesson, 2)
    assert re.search(rf"LoRA-Diffusion \(the default\) \*\*{ld:.1f}%\*\*, weight LoRA r=16 \*\*{lora:.1f}%\*\*", second)
    assert f"**{ld - lora:+.1f} points**" in second
    verdict = lesson_tab.compared(ld - lora)
    assert f"*{verdict}*" in second and ("✓" in second) == (verdict == lesson_tab.CHOICES[2][1])
    params = ctx.workspace.user(USER).adapters()
    for name in (lesson["runs"][1], lesson["runs"][2]):
        count = next(a["trainable_parameters"] for a in params if a["name"] == name)
        assert f"`{name}` | " in second and f"{count:,} |" in second


def test_the_bands_and_the_comparison_cover_every_score():
    assert [lesson_tab.band(x) for x in (0, 59.9, 60, 89.9, 90, 100)] == [
        lesson_tab.CHOICES[1][i] for i in (0, 0, 1, 1, 2, 2)]
    assert [lesson_tab.compared(d) for d in (3.1, 3, 0, -3, -3.1)] == [
        lesson_tab.COMPARED[i] for i in (0, 1, 1, 1, 2)]
    assert f"within {lesson_tab.CLOSE:g} points" in explain.KNOBS["Lesson"][explain.LESSON_QUESTIONS[2]]


def test_the_preset_reviews_are_new_to_the_task_and_labelled_by_its_rules():
    task = load_task("suite_sentiment")
    seen = {e["input"] for e in task.train + task.eval}
    assert not seen & set(lesson_tab.REVIEWS)
    kinds = " ".join(kind for kind, _, _ in lesson_tab.PRESETS)
    assert "negation" in kinds and "contrast" in kinds and len(set(lesson_tab.REVIEWS)) == len(lesson_tab.PRESETS)
    labels = dict((text, label) for _, text, label in lesson_tab.PRESETS)
    assert labels["the food was never good ."] == "negative"
    assert labels["the acting was brilliant , but the plot was dull ."] == "negative"
    assert labels["although the hotel was awful , the staff was lovely ."] == "positive"


def test_step_3_decodes_every_review_with_both_adapters_as_generate_does(ctx, trained, monkeypatch):
    decoded = spy(monkeypatch, "denoising_trajectory")
    lesson = trained["lesson"]
    expect_ld, expect_lora = list(lesson_tab.REVIEWS[:3]), []
    lesson, status, page = lesson_tab.decode_presets(ctx, USER, lesson, expect_ld, expect_lora, progress=NOOP)
    assert status.startswith(f"decoded {len(lesson_tab.PRESETS)} reviews") and page.count("<h4>") == 14
    assert lesson["predictions"][3] == {1: expect_ld, 2: expect_lora}
    # As the Generate tab decodes with a picked adapter: its answer length, greedy, seed 0, each review once.
    length = read_adapter_config(ctx.workspace.user(USER).adapter_path(lesson["runs"][1]))["response_length"]
    n = len(lesson_tab.PRESETS)
    assert [c["args"][1:] for c in decoded] == [(SENTIMENT_INSTRUCTION, text, length, length, 0.0, 0)
                                                for text in lesson_tab.REVIEWS] * 2
    answers = {1: [c["result"]["answer"] for c in decoded[:n]], 2: [c["result"]["answer"] for c in decoded[n:]]}
    assert lesson["measured"][3]["answers"] == answers
    text = lesson_tab.reveal(ctx, USER, lesson, 3)
    right = {step: sum(a == label for a, (_, _, label) in zip(answers[step], lesson_tab.PRESETS)) for step in (1, 2)}
    assert f"answered **{right[1]} of {n}** right, weight LoRA r=16 **{right[2]} of {n}**" in text
    matched = sum((a == label) == (review in expected) for step, expected in ((1, expect_ld), (2, expect_lora))
                  for a, (_, review, label) in zip(answers[step], lesson_tab.PRESETS))
    assert f"Your ticks matched {matched} of {2 * n} answers" in text
    assert text.count("(you expected it right)") == 3
    files, note = lesson_tab.export(ctx, USER, lesson, 3)  # the decodings, as a page
    assert [Path(f).name for f in files] == ["lesson-step-3-decodings.html"] and "decodings.html" in note
    assert "the film is not bad at all" in Path(files[0]).read_text()


def test_step_4_reveals_the_effective_rank_per_phase_the_library_measures(ctx, trained, monkeypatch):
    measured = spy(monkeypatch, "effective_rank_report")
    lesson = lesson_tab.new_lesson() | {"runs": dict(trained["lesson"]["runs"])}
    lesson, note, figure = lesson_tab.effective_rank(ctx, USER, lesson, lesson_tab.CHOICES[4][1], progress=NOOP)
    assert note.startswith("Effective rank") and "suite_struct" in note  # two steps: the Analyse tab's note
    (call,) = measured
    ws = ctx.workspace.user(USER)
    assert call["args"][0] == [ws.adapter_path(lesson["runs"][s]) for s in (1, 2)]
    assert {k: call["kwargs"][k] for k in lesson_tab.ANALYSIS} == lesson_tab.ANALYSIS == dict(n_examples=32, steps=8)
    ld = call["result"]["methods"][0]
    assert ld["t"] == [1.0, 0.5]  # a word and [SEP]: an early step and a middle one, no late step
    early, middle = ld["effective_rank"]
    highest = "early" if early >= middle else "middle"
    text = lesson_tab.reveal(ctx, USER, lesson, 4)
    assert f"in the **{highest}** phase ({max(early, middle):.1f})" in text
    lora_early = call["result"]["methods"][1]["effective_rank"][0]
    assert f"| {lesson_tab.PHASE_CHOICES['early']} | {early:.1f} | {lora_early:.1f} |" in text
    assert f"| {lesson_tab.PHASE_CHOICES['late']} | no step | no step |" in text and "late phase had none" in text
    assert ("✓ your prediction matched" in text) == (highest == "middle")
    files, _ = lesson_tab.export(ctx, USER, lesson, 4)
    assert Path(files[0]).name.endswith("-lesson-step-4-effective-rank.html")


def test_step_5_reveals_the_forgetting_the_library_measures(ctx, trained, monkeypatch):
    measured = spy(monkeypatch, "forgetting_report")
    lesson = lesson_tab.new_lesson() | {"runs": dict(trained["lesson"]["runs"])}
    lesson, line, figure = lesson_tab.forgetting(ctx, USER, lesson, lesson_tab.FORGOT[0], progress=NOOP)
    assert line.startswith(f"scored {lesson_tab.FORGETTING_ROWS} rows")
    (call,) = measured
    assert call["kwargs"]["rows"] == lesson_tab.FORGETTING_ROWS and call["kwargs"]["data_dir"] == ctx.data_dir
    change = [sum(m["delta_nelbo"].values()) / len(m["delta_nelbo"]) for m in call["result"]["models"][1:]]
    text = lesson_tab.reveal(ctx, USER, lesson, 5)
    assert f"**{change[0]:+.3f}**, weight LoRA r=16 **{change[1]:+.3f}**" in text
    answer = lesson_tab.FORGOT[2] if max(change) <= 0 else lesson_tab.FORGOT[0 if change[0] > change[1] else 1]
    assert f"*{answer}*" in text and ("✓" in text) == (answer == lesson_tab.FORGOT[0])
    files, note = lesson_tab.export(ctx, USER, lesson, 5)
    assert Path(files[0]).name.endswith("-lesson-step-5-forgetting.html")


def test_export_writes_each_steps_figures_as_html_and_says_when_png_cannot_be_made(ctx, trained):
    lesson = trained["lesson"]
    files, note = lesson_tab.export(ctx, USER, lesson, 1)
    html = [Path(f) for f in files if f.endswith(".html")]
    assert len(html) == 1 and html[0].name.endswith("-lesson-step-1-loss-curve.html")
    assert html[0].is_relative_to(ctx.workspace.user(USER).exports())
    page = html[0].read_text()
    assert "plotly" in page[:100000] and lesson["runs"][1] in page  # the run's own curve, read from its log
    steps_logged = [r["step"] for r in ctx.workspace.user(USER).curve(lesson["runs"][1]) if "loss" in r]
    assert steps_logged == list(trained["figure"][0].data[0].x)  # the curve the page showed at the end
    if not png_available():  # no PNG, and the line says why in the library's words
        assert len(files) == 1 and "(HTML only: PNG figures need kaleido" in note


def test_a_step_out_of_order_or_without_a_prediction_is_one_readable_line(ctx, trained):
    fresh = lesson_tab.new_lesson()
    assert "run step 1 first" in refused(lambda: lesson_tab.train(ctx, USER, fresh, 2, lesson_tab.CHOICES[2][0],
                                                                  progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.train(ctx, USER, fresh, 1, None, progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.train(ctx, USER, fresh, 1, "surely 100%",
                                                                            progress=NOOP))
    for step, needs in {1: 1, 2: 1, 3: 3, 4: 4, 5: 5}.items():  # steps 1 and 2 reveal step 1's score first
        assert f"run step {needs} first" in refused(
            lambda s=step: lesson_tab.reveal(ctx, USER, fresh, s))
        assert f"step {step} has no figures yet" in refused(lambda s=step: lesson_tab.export(ctx, USER, fresh, s))
    assert "run step 1 first" in refused(lambda: lesson_tab.decode_presets(ctx, USER, fresh, [], [], progress=NOOP))
    assert "run step 1 first" in refused(lambda: lesson_tab.effective_rank(ctx, USER, fresh, lesson_tab.CHOICES[4][0],
                                                                           progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.forgetting(ctx, USER, fresh, None,
                                                                                 progress=NOOP))
    assert "tick reviews from the list" in refused(lambda: lesson_tab.decode_presets(
        ctx, USER, trained["lesson"], ["../etc/passwd"], [], progress=NOOP))
    assert "user id" in refused(lambda: lesson_tab.reveal(ctx, "../x", trained["lesson"], 1))
    assert "not valid" in refused(lambda: lesson_tab.reveal(ctx, USER, {"runs": "x"}, 1))
    assert "step must be between 1 and 5" in refused(lambda: lesson_tab.export(ctx, USER, fresh, 9))


def test_a_stopped_run_is_revealed_as_unscored(ctx):
    user = "lesson-user-stop"
    lesson = lesson_tab.new_lesson()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(lesson_tab.RUN, "steps", 5000)
        running = lesson_tab.train(ctx, user, lesson, 1, lesson_tab.CHOICES[1][0], progress=NOOP)
        lesson = next(running)[0]
        job = ctx.workspace.user(user).job(lesson["runs"][1])
        while job.step < 1:
            time.sleep(0.05)
        assert "still running" in refused(lambda: lesson_tab.reveal(ctx, user, lesson, 1))
        assert lesson_tab.stop(ctx, user, lesson, 1).startswith("stopping after the current step")
        list(running)
    assert "has no held-out score (stopped at step" in refused(lambda: lesson_tab.reveal(ctx, user, lesson, 1))


def test_reset_needs_the_tick_clears_the_workspace_and_starts_the_lesson_over(ctx, tiny_base_dir):
    user = "lesson-user-reset"
    lesson = run_step(ctx, lesson_tab.new_lesson(), 1, lesson_tab.CHOICES[1][0], user=user)[0]
    assert "tick 'yes, clear my workspace for the next group' first" in refused(
        lambda: lesson_tab.reset(ctx, user, False))
    assert ctx.workspace.user(user).adapters()
    message, ticked, fresh = lesson_tab.reset(ctx, user, True)
    assert message.startswith("deleted all your runs and adapters (1)") and ticked is False
    assert fresh == lesson_tab.new_lesson() and ctx.workspace.user(user).adapters() == []
    assert ctx.workspace.user(USER).adapters()  # another user's runs are untouched
    assert "adapter is gone" in refused(lambda: lesson_tab.reveal(ctx, user, lesson, 1))  # an old page's state
    assert len(lesson_tab.emptied_page(3)) == 3


# ---- The tab on the page ------------------------------------------------------------------

# What tests/test_app.py's browser steps find by name or label on the whole page: nothing of the Lesson
# tab may match them too (a Playwright locator that matches twice is an error).
BROWSER_BUTTONS_EXACT = {"Train", "Stop", "Generate", "Delete", "Show"}
BROWSER_BUTTONS_PART = ("Refresh adapters", "Effective rank per step", "Show scaling",
                        "Delete all my adapters and runs")
BROWSER_LABELS_PART = ("max train examples (0 = all)", "ranks", "yes, delete everything of mine")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    config = main.build(Workspace(tmp_path_factory.mktemp("page"))).config
    components = {c["id"]: c for c in config["components"]}
    tab = next(c for c in components.values() if c["type"] == "tabitem" and c["props"]["label"] == "Lesson")

    def inside(node, found=False):
        here = found or node["id"] == tab["id"]
        yield from ([components[node["id"]]] if here and node["id"] != tab["id"] else [])
        for child in node.get("children", []):
            yield from inside(child, here)
    return list(inside(config["layout"]))


def test_the_lesson_tab_has_every_step_with_stable_ids_and_no_name_the_browser_test_uses(page):
    ids = {c["props"].get("elem_id") for c in page}
    for step in range(1, 6):
        assert {f"lesson-run-{step}", f"lesson-reveal-button-{step}", f"lesson-reveal-{step}",
                f"lesson-export-{step}", f"lesson-file-{step}", f"lesson-status-{step}"} <= ids
    assert {"lesson-predict-1", "lesson-predict-3-ld", "lesson-predict-3-lora", "lesson-stop-1", "lesson-plot-4",
            "lesson-decodings", "lesson-reset-confirm", "lesson-reset", "lesson-reset-message"} <= ids
    buttons = [c["props"]["value"] for c in page if c["type"] == "button"]
    labels = [c["props"].get("label") or "" for c in page if c["type"] not in ("button", "markdown")]
    labels += [c["props"].get("info") or "" for c in page]
    assert not BROWSER_BUTTONS_EXACT & set(buttons)
    assert not any(part.lower() in b.lower() for part in BROWSER_BUTTONS_PART for b in buttons)
    assert not any(part in text for part in BROWSER_LABELS_PART for text in labels)
    assert "steps" not in labels
    radio = next(c for c in page if c["props"].get("elem_id") == "lesson-predict-1")
    assert radio["props"]["choices"] and radio["props"].get("value") is None  # nothing predicted for the student
