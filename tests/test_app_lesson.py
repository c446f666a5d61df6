"""The Lesson tab's handlers called directly, on the tiny random base (no browser, no server).

Every step runs through the handlers the page calls; each reveal must report what the library
measures for the runs in the workspace, compare it with the prediction locked in at Run, and
every refusal must be one readable line. The lesson is the server's (`Lessons`): a step that measured
adapters replaced while it ran (a rerun, a reset) must not write its stale result back.
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


def run_step(ctx, lessons, step, prediction, user=USER):
    """A training step to its end: the last status, figure, metric it streamed."""
    updates = list(lesson_tab.train(ctx, lessons, user, step, prediction, progress=NOOP))
    assert all(len(u) == 3 for u in updates)  # only what the page shows: the lesson stays on the server
    return updates[-1]


def lesson_of(ctx, lessons, user=USER) -> dict:
    return lessons.read(ctx.workspace.user(user))


def holding(ctx, lesson, user=USER) -> lesson_tab.Lessons:
    """Lessons in which `user`'s lesson is (a copy of) `lesson`: each test changes its own."""
    lessons = lesson_tab.Lessons()
    lessons.update(ctx.workspace.user(user), lambda kept: kept.update(lesson))
    return lessons


@pytest.fixture(scope="module")
def trained(ctx):
    """A lesson with steps 1 and 2 run: the predictions made before each run, and what the runs streamed."""
    lessons = lesson_tab.Lessons()
    status1, figure1, metric1 = run_step(ctx, lessons, 1, lesson_tab.CHOICES[1][2])
    status2, figure2, metric2 = run_step(ctx, lessons, 2, lesson_tab.CHOICES[2][1])
    return {"lesson": lesson_of(ctx, lessons), "status": (status1, status2), "figure": (figure1, figure2),
            "metric": (metric1, metric2)}


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
    lesson, lessons = trained["lesson"], holding(ctx, trained["lesson"])
    ld, lora = (100 * results(ctx, lesson["runs"][step])["accuracy"] for step in (1, 2))
    first = lesson_tab.reveal(ctx, lessons, USER, 1)
    assert f"held-out accuracy **{ld:.1f}%**" in first and lesson["runs"][1] in first
    band = lesson_tab.band(ld)
    assert f"*{band}*" in first
    assert ("✓ your prediction matched" in first) == (band == lesson_tab.CHOICES[1][2])
    second = lesson_tab.reveal(ctx, lessons, USER, 2)
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
    lessons = holding(ctx, trained["lesson"])
    expect_ld, expect_lora = list(lesson_tab.REVIEWS[:3]), []
    status, page = lesson_tab.decode_presets(ctx, lessons, USER, expect_ld, expect_lora, progress=NOOP)
    lesson = lesson_of(ctx, lessons)
    assert status.startswith(f"decoded {len(lesson_tab.PRESETS)} reviews") and page.count("<h4>") == 14
    assert lesson["predictions"][3] == {1: expect_ld, 2: expect_lora}
    # As the Generate tab decodes with a picked adapter: its answer length, greedy, seed 0, each review once.
    length = read_adapter_config(ctx.workspace.user(USER).adapter_path(lesson["runs"][1]))["response_length"]
    n = len(lesson_tab.PRESETS)
    assert [c["args"][1:] for c in decoded] == [(SENTIMENT_INSTRUCTION, text, length, length, 0.0, 0)
                                                for text in lesson_tab.REVIEWS] * 2
    answers = {1: [c["result"]["answer"] for c in decoded[:n]], 2: [c["result"]["answer"] for c in decoded[n:]]}
    assert lesson["measured"][3]["answers"] == answers and lesson["pages"][3] == {"decodings": page}
    assert lesson["runs"] == trained["lesson"]["runs"]  # step 3 wrote its own part only
    text = lesson_tab.reveal(ctx, lessons, USER, 3)
    right = {step: sum(a == label for a, (_, _, label) in zip(answers[step], lesson_tab.PRESETS)) for step in (1, 2)}
    assert f"answered **{right[1]} of {n}** right, weight LoRA r=16 **{right[2]} of {n}**" in text
    matched = sum((a == label) == (review in expected) for step, expected in ((1, expect_ld), (2, expect_lora))
                  for a, (_, review, label) in zip(answers[step], lesson_tab.PRESETS))
    assert f"Your ticks matched {matched} of {2 * n} answers" in text
    assert text.count("(you expected it right)") == 3
    files, note = lesson_tab.export(ctx, lessons, USER, 3)  # the decodings, as a page
    assert [Path(f).name for f in files] == ["lesson-step-3-decodings.html"] and "decodings.html" in note
    assert "the film is not bad at all" in Path(files[0]).read_text()


def test_step_4_reveals_the_effective_rank_per_phase_the_library_measures(ctx, trained, monkeypatch):
    measured = spy(monkeypatch, "effective_rank_report")
    lessons = holding(ctx, lesson_tab.new_lesson() | {"runs": dict(trained["lesson"]["runs"])})
    note, figure = lesson_tab.effective_rank(ctx, lessons, USER, lesson_tab.CHOICES[4][1], progress=NOOP)
    lesson = lesson_of(ctx, lessons)
    assert lesson["predictions"] == {4: lesson_tab.CHOICES[4][1]} and lesson["figures"][4] == {"effective-rank": figure}
    assert note.startswith("Effective rank") and "suite_struct" in note  # two steps: the Analyse tab's note
    (call,) = measured
    ws = ctx.workspace.user(USER)
    assert call["args"][0] == [ws.adapter_path(lesson["runs"][s]) for s in (1, 2)]
    assert {k: call["kwargs"][k] for k in lesson_tab.ANALYSIS} == lesson_tab.ANALYSIS == dict(n_examples=32, steps=8)
    ld = call["result"]["methods"][0]
    assert ld["t"] == [1.0, 0.5]  # a word and [SEP]: an early step and a middle one, no late step
    early, middle = ld["effective_rank"]
    highest = "early" if early >= middle else "middle"
    text = lesson_tab.reveal(ctx, lessons, USER, 4)
    assert f"in the **{highest}** phase ({max(early, middle):.1f})" in text
    lora_early = call["result"]["methods"][1]["effective_rank"][0]
    assert f"| {lesson_tab.PHASE_CHOICES['early']} | {early:.1f} | {lora_early:.1f} |" in text
    assert f"| {lesson_tab.PHASE_CHOICES['late']} | no step | no step |" in text and "late phase had none" in text
    assert ("✓ your prediction matched" in text) == (highest == "middle")
    files, _ = lesson_tab.export(ctx, lessons, USER, 4)
    assert Path(files[0]).name.endswith("-lesson-step-4-effective-rank.html")


def test_step_5_reveals_the_forgetting_the_library_measures(ctx, trained, monkeypatch):
    measured = spy(monkeypatch, "forgetting_report")
    lessons = holding(ctx, lesson_tab.new_lesson() | {"runs": dict(trained["lesson"]["runs"])})
    line, figure = lesson_tab.forgetting(ctx, lessons, USER, lesson_tab.FORGOT[0], progress=NOOP)
    assert lesson_of(ctx, lessons)["figures"][5] == {"forgetting": figure}
    assert line.startswith(f"scored {lesson_tab.FORGETTING_ROWS} rows")
    (call,) = measured
    assert call["kwargs"]["rows"] == lesson_tab.FORGETTING_ROWS and call["kwargs"]["data_dir"] == ctx.data_dir
    change = [sum(m["delta_nelbo"].values()) / len(m["delta_nelbo"]) for m in call["result"]["models"][1:]]
    text = lesson_tab.reveal(ctx, lessons, USER, 5)
    assert f"**{change[0]:+.3f}**, weight LoRA r=16 **{change[1]:+.3f}**" in text
    answer = lesson_tab.FORGOT[2] if max(change) <= 0 else lesson_tab.FORGOT[0 if change[0] > change[1] else 1]
    assert f"*{answer}*" in text and ("✓" in text) == (answer == lesson_tab.FORGOT[0])
    files, note = lesson_tab.export(ctx, lessons, USER, 5)
    assert Path(files[0]).name.endswith("-lesson-step-5-forgetting.html")


def test_export_writes_each_steps_figures_as_html_and_says_when_png_cannot_be_made(ctx, trained):
    lesson = trained["lesson"]
    files, note = lesson_tab.export(ctx, holding(ctx, lesson), USER, 1)
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
    fresh, lessons = lesson_tab.Lessons(), holding(ctx, trained["lesson"])
    assert "run step 1 first" in refused(lambda: lesson_tab.train(ctx, fresh, USER, 2, lesson_tab.CHOICES[2][0],
                                                                  progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.train(ctx, fresh, USER, 1, None, progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.train(ctx, fresh, USER, 1, "surely 100%",
                                                                            progress=NOOP))
    for step, needs in {1: 1, 2: 1, 3: 3, 4: 4, 5: 5}.items():  # steps 1 and 2 reveal step 1's score first
        assert f"run step {needs} first" in refused(
            lambda s=step: lesson_tab.reveal(ctx, fresh, USER, s))
        assert f"step {step} has no figures yet" in refused(lambda s=step: lesson_tab.export(ctx, fresh, USER, s))
    assert "run step 1 first" in refused(lambda: lesson_tab.decode_presets(ctx, fresh, USER, [], [], progress=NOOP))
    assert "run step 1 first" in refused(lambda: lesson_tab.effective_rank(ctx, fresh, USER, lesson_tab.CHOICES[4][0],
                                                                           progress=NOOP))
    assert "pick your prediction first" in refused(lambda: lesson_tab.forgetting(ctx, fresh, USER, None,
                                                                                 progress=NOOP))
    assert "tick reviews from the list" in refused(lambda: lesson_tab.decode_presets(
        ctx, lessons, USER, ["../etc/passwd"], [], progress=NOOP))
    assert "user id" in refused(lambda: lesson_tab.reveal(ctx, lessons, "../x", 1))
    assert "step must be between 1 and 5" in refused(lambda: lesson_tab.export(ctx, fresh, USER, 9))
    assert lesson_of(ctx, fresh) == lesson_tab.new_lesson()  # a refused step keeps nothing, not even its prediction
    assert lesson_of(ctx, lessons) == trained["lesson"]


def test_a_stopped_run_is_revealed_as_unscored(ctx):
    user, lessons = "lesson-user-stop", lesson_tab.Lessons()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(lesson_tab.RUN, "steps", 5000)
        running = lesson_tab.train(ctx, lessons, user, 1, lesson_tab.CHOICES[1][0], progress=NOOP)
        next(running)
        job = ctx.workspace.user(user).job(lesson_of(ctx, lessons, user)["runs"][1])  # written as the run starts
        while job.step < 1:
            time.sleep(0.05)
        assert "still running" in refused(lambda: lesson_tab.reveal(ctx, lessons, user, 1))
        assert lesson_tab.stop(ctx, lessons, user, 1).startswith("stopping after the current step")
        list(running)
    assert "has no held-out score (stopped at step" in refused(lambda: lesson_tab.reveal(ctx, lessons, user, 1))


def test_reset_needs_the_tick_clears_the_workspace_and_starts_the_lesson_over(ctx, tiny_base_dir):
    user, lessons = "lesson-user-reset", lesson_tab.Lessons()
    run_step(ctx, lessons, 1, lesson_tab.CHOICES[1][0], user=user)
    lessons.update(ctx.workspace.user(USER), lambda lesson: lesson["predictions"].update({1: "another user's"}))
    other = lesson_of(ctx, lessons, USER)
    assert other["predictions"] == {1: "another user's"}  # a lesson of someone else, in the same store
    assert "tick 'yes, clear my workspace for the next group' first" in refused(
        lambda: lesson_tab.reset(ctx, lessons, user, False))
    assert ctx.workspace.user(user).adapters() and lesson_of(ctx, lessons, user)["runs"]
    message, ticked = lesson_tab.reset(ctx, lessons, user, True)
    assert message.startswith("deleted all your runs and adapters (1)") and ticked is False
    assert lesson_of(ctx, lessons, user) == lesson_tab.new_lesson() and ctx.workspace.user(user).adapters() == []
    assert "run step 1 first" in refused(lambda: lesson_tab.reveal(ctx, lessons, user, 1))  # the lesson starts over
    assert ctx.workspace.user(USER).adapters()  # another user's runs are untouched
    assert lesson_of(ctx, lessons, USER) == other
    assert len(lesson_tab.emptied_page(3)) == 3


def test_a_lesson_whose_adapter_was_deleted_elsewhere_says_so(ctx):
    """The Train tab's reset (or delete) leaves the lesson naming a run that is gone."""
    user, lessons = "lesson-user-gone", lesson_tab.Lessons()
    run_step(ctx, lessons, 1, lesson_tab.CHOICES[1][0], user=user)
    assert ctx.workspace.user(user).reset() == 1
    assert "adapter is gone" in refused(lambda: lesson_tab.reveal(ctx, lessons, user, 1))


def test_the_same_user_id_finds_the_same_lesson_and_each_user_has_their_own(ctx, trained):
    lessons = holding(ctx, trained["lesson"])
    assert lesson_of(ctx, lessons) == trained["lesson"]  # the same user id (a reload): the same lesson
    assert lesson_of(ctx, lessons, "lesson-user-other") == lesson_tab.new_lesson()
    copy = lesson_of(ctx, lessons)
    copy["runs"][1] = "changed-by-a-reader"
    assert lesson_of(ctx, lessons)["runs"] == trained["lesson"]["runs"]  # a read is a copy


# ---- Steps that overlap: a stale result is refused, not written back ----------------------

def test_a_measurement_of_runs_replaced_while_it_ran_is_refused(ctx, trained, monkeypatch):
    """Step 4 measures while step 1 is run again (the rerun starts inside the measurement)."""
    lessons = holding(ctx, trained["lesson"])
    real, rerun = lesson_tab.effective_rank_report, []

    def measured_during_a_rerun(*args, **kwargs):
        rerun.append(run_step(ctx, lessons, 1, lesson_tab.CHOICES[1][1]))
        return real(*args, **kwargs)
    monkeypatch.setattr(lesson_tab, "effective_rank_report", measured_during_a_rerun)
    message = refused(lambda: lesson_tab.effective_rank(ctx, lessons, USER, lesson_tab.CHOICES[4][0], progress=NOOP))
    assert message == "the lesson's adapters changed while step 4 ran (a rerun or a reset): run step 4 again"
    lesson = lesson_of(ctx, lessons)
    assert rerun and lesson["runs"][1] != trained["lesson"]["runs"][1]  # the new run is kept, not the old one
    assert lesson["runs"][2] == trained["lesson"]["runs"][2]
    assert lesson["predictions"] == {1: lesson_tab.CHOICES[1][1], 2: lesson_tab.CHOICES[2][1]}
    assert 4 not in lesson["measured"] and 4 not in lesson["figures"]
    assert "run step 4 first" in refused(lambda: lesson_tab.reveal(ctx, lessons, USER, 4))


def test_a_rerun_drops_what_the_later_steps_measured_with_the_old_runs(ctx, trained):
    lessons = holding(ctx, trained["lesson"])
    lessons.record(ctx.workspace.user(USER), 5, dict(trained["lesson"]["runs"]), predictions=lesson_tab.FORGOT[0],
                   measured={1: {}, 2: {}}, figures={"forgetting": None})
    assert 5 in lesson_of(ctx, lessons)["measured"]
    run_step(ctx, lessons, 2, lesson_tab.CHOICES[2][0])
    lesson = lesson_of(ctx, lessons)
    assert lesson["runs"][2] != trained["lesson"]["runs"][2] and lesson["runs"][1] == trained["lesson"]["runs"][1]
    assert 5 not in lesson["measured"] and 5 not in lesson["figures"]
    assert lesson["predictions"][2] == lesson_tab.CHOICES[2][0]


def test_a_reset_during_a_step_leaves_the_lesson_empty(ctx, monkeypatch):
    """The instructor resets while step 3 decodes: the decodings of the deleted adapters are not kept."""
    user, lessons = "lesson-user-race", lesson_tab.Lessons()
    for step in (1, 2):
        run_step(ctx, lessons, step, lesson_tab.CHOICES[step][0], user=user)
    real, decoded, resets = lesson_tab.denoising_trajectory, [], []

    def decoded_during_a_reset(*args, **kwargs):
        decoded.append(real(*args, **kwargs))
        if len(decoded) == 2 * len(lesson_tab.REVIEWS):  # the last review, both adapters loaded: reset now
            resets.append(lesson_tab.reset(ctx, lessons, user, True))
        return decoded[-1]
    monkeypatch.setattr(lesson_tab, "denoising_trajectory", decoded_during_a_reset)
    message = refused(lambda: lesson_tab.decode_presets(ctx, lessons, user, [], [], progress=NOOP))
    assert message == "the lesson's adapters changed while step 3 ran (a rerun or a reset): run step 3 again"
    assert resets[0][0].startswith("deleted all your runs and adapters (2)")
    assert lesson_of(ctx, lessons, user) == lesson_tab.new_lesson()
    assert ctx.workspace.user(user).adapters() == []


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


def test_no_lesson_event_hands_a_copy_of_the_lesson_back_to_the_page(tmp_path):
    """The lesson is the server's: a page holding a copy could write an old one back."""
    config = main.build(Workspace(tmp_path)).config
    components = {c["id"]: c for c in config["components"]}
    lesson_ids = {c["id"] for c in components.values() if str(c["props"].get("elem_id", "")).startswith("lesson-")}
    events = [d for d in config["dependencies"] if {t[0] for t in d["targets"]} & lesson_ids]
    assert len(events) >= 5 * 3 + 2 + 1  # run, reveal, export of each step; the two stops; the reset
    assert not [o for d in events for o in d["outputs"] if components[o]["type"] == "state"]


def test_the_store_keeps_the_most_recent_users_lessons(ctx, monkeypatch):
    """Lessons of users long gone are forgotten (their adapters stay): the store does not grow without end."""
    monkeypatch.setattr(lesson_tab.Lessons, "KEPT", 2)
    lessons = lesson_tab.Lessons()
    users = [f"lesson-user-kept-{i}" for i in range(3)]
    for i, user in enumerate(users):
        lessons.update(ctx.workspace.user(user), lambda lesson, i=i: lesson["predictions"].update({1: i}))
    assert [lesson_of(ctx, lessons, u)["predictions"] for u in users] == [{}, {1: 1}, {1: 2}]


def test_a_run_recorded_during_a_reset_lands_in_the_new_lesson(ctx):
    """The reset empties the workspace and the lesson under one lock: a step-1 run that starts meanwhile waits,
    then is recorded in the fresh lesson (not wiped with the old one, leaving a run the lesson cannot stop)."""
    import threading

    ws, lessons = ctx.workspace.user("lesson-user-racing"), lesson_tab.Lessons()
    started = []

    def clear():
        record = threading.Thread(target=lessons.update, args=(ws, lambda l: l["runs"].update({1: "new-run"})))
        record.start()
        record.join(0.3)
        started.append(record)
        return "cleared" if record.is_alive() else "the run was recorded during the reset"

    assert lessons.reset(ws, clear) == "cleared"
    started[0].join(5)
    assert lesson_of(ctx, lessons, "lesson-user-racing")["runs"] == {1: "new-run"}
