"""Lesson: a guided path through the other tabs for a workshop, in numbered steps.

Each step asks a question first (a prediction the student picks), then runs what the other tabs
run (the Train tab's `train`, the library's decoding, effective-rank and forgetting reports that
the Generate and Analyse tabs call), then reveals what was measured in the user's workspace next
to the prediction. Run locks the prediction in: the reveal judges the answer given before the run.

The lesson (predictions, the adapters its steps trained, what each step measured and drew; see
`new_lesson`) is kept on the server per user (`Lessons`), not in the page: the steps run at once (a
training streams while another step measures), and a page's copy handed back by a slow step would
put back old runs and old measurements. So a reload of the page keeps the lesson (same user id, same
lesson); a restart of the server forgets it (predictions, which runs were the lesson's, what was
measured), not its adapters, which stay in the user's workspace, where the Train tab lists them too.
The instructor's tools: each step's figures exported as HTML pages (and PNG where kaleido is
installed), and a reset of the workspace and the lesson for the next group (`Workspace.reset`).
"""

from __future__ import annotations

import functools
import html
import threading
from collections import OrderedDict

import gradio as gr

from lora_diffusion.adapters import load_model, read_adapter_config
from lora_diffusion.analysis.forgetting import forgetting_report
from lora_diffusion.analysis.rank import effective_rank_report, phase_means
from lora_diffusion.analysis.trajectories import denoising_trajectory
from lora_diffusion.data import SENTIMENT_INSTRUCTION
from lora_diffusion.diffusion import PHASES
from lora_diffusion.errors import UserError
from lora_diffusion.files import write_text
from lora_diffusion.plots import effective_rank_figure, forgetting_figure, training_figure
from lora_diffusion.suite import render_contrast, render_review
from lora_diffusion.workspace import Workspace

from . import analyse_tab, explain, generate_tab, train_tab
from .common import Context, handler, readable_errors, user_workspace, whole
from .explain import knob

STEPS = 5
# The two adapters the lesson trains, by the step that trains them: the Train tab's default run, then weight
# LoRA r=16 with everything else the same (task, examples, steps, batch, seed; each method's default rate).
RUN = dict(train_tab.DEFAULT_RUN, csv_file=None, text_column="text", label_column="label")
TRAINED = {1: (RUN["method"], {}), 2: ("lora", {"r": 16})}
NAMES = {1: "LoRA-Diffusion (the default)", 2: "weight LoRA r=16"}
CLOSE = 3.0  # points of held-out accuracy within which the lesson calls two adapters even
ANALYSIS = dict(n_examples=32, steps=8)  # effective rank: the Analyse tab's defaults
FORGETTING_ROWS = 8  # rows of 128 tokens per text source: the Analyse tab's least, a few seconds per model

# Step 1: how well the default run does on held-out reviews, as a band of accuracy (lower bound in %).
BANDS = {"below 60%: close to guessing between two balanced labels": 0, "60% to 90%": 60, "90% or more": 90}
# Step 2: LoRA-Diffusion against weight LoRA, by their difference in held-out accuracy.
COMPARED = (f"LoRA-Diffusion more than {CLOSE:g} points higher", f"within {CLOSE:g} points of each other",
            f"weight LoRA more than {CLOSE:g} points higher")
# Step 4: the phase in which LoRA-Diffusion's change has the highest effective rank.
PHASE_CHOICES = {"early": "early: most of the answer still masked (t > 2/3)", "middle": "middle (1/3 < t ≤ 2/3)",
                 "late": "late: most of the answer revealed (t ≤ 1/3)"}
# Step 5: which adapter scores ordinary text worse than the base by more.
FORGOT = ("LoRA-Diffusion forgets more", "weight LoRA forgets more",
          "neither: both score ordinary text as well as the base, or better")
CHOICES = {1: tuple(BANDS), 2: COMPARED, 4: tuple(PHASE_CHOICES.values()), 5: FORGOT}

# Step 3: reviews written for the lesson, none of them in the task's data (a test checks it); the right answer
# comes from the suite's own rules where it has one (a negation flips the label, the deciding clause of a
# contrast decides).
PRESETS = (
    ("the Generate tab's review: a negation, then praise", "the film is not bad at all , i loved it .", "positive"),
    ("plain praise", *render_review("movie", "wonderful", intensifier="truly")),
    ("plain criticism", *render_review("service", "terrible")),
    ("negation: never", *render_review("food", "good", negation="never")),
    ("negation: not ... at all", *render_review("ending", "bad", negation="not at all")),
    ("contrast: the clause after 'but' decides", *render_contrast(("acting", "brilliant", "", ""),
                                                                  ("plot", "dull", "", ""))),
    ("contrast: the main clause after 'although' decides", *render_contrast(
        ("hotel", "awful", "", ""), ("staff", "lovely", "", ""), connective="although")),
)
REVIEWS = tuple(text for _, text, _ in PRESETS)


def new_lesson() -> dict:
    """A lesson not yet started: per step, the prediction locked in, the adapter trained, what was measured,
    the figures of an analysis (file stem -> plotly figure) and HTML pages (file stem -> HTML) it showed."""
    return {"predictions": {}, "runs": {}, "measured": {}, "figures": {}, "pages": {}}


def _copy(lesson: dict) -> dict:
    """A lesson whose parts can be changed without touching `lesson` (each step's entry is replaced whole,
    never changed in place)."""
    return {key: dict(part) for key, part in lesson.items()}


class Lessons:
    """Every user's lesson, kept on the server (keyed by the user's workspace) under a lock.

    Each step changes only its own part, under the lock: a step that measured the adapters of runs since
    replaced (step 1 or 2 rerun, or the instructor's reset) is refused rather than writing its stale result.
    """

    KEPT = 256  # lessons of the most recent users (as many as the workspace keeps users in memory)

    def __init__(self):
        self._lessons: OrderedDict = OrderedDict()  # the user's workspace folder -> lesson, least recent first
        self._lock = threading.Lock()

    def read(self, ws: Workspace) -> dict:
        """A copy of the user's lesson (a new one before any step has run)."""
        with self._lock:
            return _copy(self._lessons.get(ws.root, new_lesson()))

    def update(self, ws: Workspace, change) -> None:
        """Apply `change(lesson)` under the lock; kept only if it returns (a refusal changes nothing)."""
        with self._lock:
            lesson = _copy(self._lessons.get(ws.root, new_lesson()))
            change(lesson)
            self._lessons.pop(ws.root, None)
            self._lessons[ws.root] = lesson
            while len(self._lessons) > self.KEPT:  # a forgotten lesson loses its predictions, not its adapters
                self._lessons.popitem(last=False)

    def record(self, ws: Workspace, step: int, runs: dict, **parts) -> None:
        """Keep what step `step` measured (`parts`: predictions, measured, figures, pages -> its entry) with the
        adapters of `runs` ({step: run}, read as it started), unless the lesson's runs changed meanwhile."""
        def change(lesson):
            if {s: lesson["runs"].get(s) for s in runs} != runs:
                raise UserError(f"the lesson's adapters changed while step {step} ran (a rerun or a reset): "
                                f"run step {step} again")
            for part, value in parts.items():
                lesson[part][step] = value
        self.update(ws, change)

    def reset(self, ws: Workspace, clear):
        """The user's lesson starts over (the instructor's reset), after `clear()` (which empties the workspace)
        under the same lock: a step-1 run starting meanwhile is recorded in the new lesson, not wiped with the
        old one. Returns what `clear` returns."""
        with self._lock:
            cleared = clear()
            self._lessons.pop(ws.root, None)
        return cleared


def _step(step) -> int:
    return whole(step, "the step", 1, STEPS)


def _predicted(step: int, prediction):
    """The prediction made before the run; a run without one is refused (predicting is the point)."""
    if prediction not in CHOICES[step]:
        raise UserError(f"step {step}: pick your prediction first, then run (the reveal compares it with "
                        "what the run measures)")
    return prediction


def _verdict(predicted, measured) -> str:
    if predicted is None:
        return "You made no prediction for this step."
    mark = "✓ your prediction matched" if predicted == measured else "✗ not what you predicted"
    return f"You predicted *{predicted}*: {mark}."


# ---- Steps 1 and 2: train ----------------------------------------------------------------

@readable_errors
def train(ctx: Context, lessons: Lessons, user, step, prediction, progress=gr.Progress()):
    """Train step `step`'s adapter (1: the default run, 2: weight LoRA r=16) through the Train tab's handler;
    streams (status, loss figure, score line) until the run ends."""
    ws, step = user_workspace(ctx, user), _step(step)
    if step not in TRAINED:
        raise UserError(f"step {step} trains nothing: press its own Run button")
    if step == 2 and 1 not in lessons.read(ws)["runs"]:
        raise UserError("run step 1 first: weight LoRA is compared with the LoRA-Diffusion adapter it trains")
    prediction = _predicted(step, prediction)
    method, options = TRAINED[step]
    updates = train_tab.train(ctx, user, **dict(RUN, method=method, options=options), progress=progress)
    job_id, status, figure, metric = next(updates)

    def started(lesson):  # once, as the run starts; its loss curve is read back from the run's log when exported
        lesson["predictions"][step], lesson["runs"][step] = prediction, job_id
        for later in range(3, STEPS + 1):  # they measured the adapters of the runs this one replaces
            for part in ("measured", "figures", "pages"):
                lesson[part].pop(later, None)
    lessons.update(ws, started)
    yield status, figure, metric
    for _, status, figure, metric in updates:
        yield status, figure, metric


@readable_errors
def stop(ctx: Context, lessons: Lessons, user, step):
    """Stop the run of step `step` (the Train tab's Stop), whatever stage it is at."""
    runs = lessons.read(user_workspace(ctx, user))["runs"]
    return train_tab.stop(ctx, user, runs.get(_step(step), ""))


def _trained(ws: Workspace, lesson: dict, step: int) -> dict:
    """The workspace's listing of the adapter step `step` trained (name, score, parameters), once it is scored."""
    name = lesson["runs"].get(step)
    if not name:
        raise UserError(f"run step {step} first: this needs the adapter it trains")
    job = ws.jobs.get(name)
    if job is not None and not job.finished:
        raise UserError(f"step {step}'s run is still {job.status}: wait until it is done")
    if job is not None and job.status == "failed":
        raise UserError(f"step {step}'s run failed ({job.error}): run step {step} again")
    entry = next((a for a in ws.adapters() if a["name"] == name), None)
    if entry is None:
        raise UserError(f"step {step}'s adapter is gone (deleted, or the workspace was reset): run step {step} again")
    if entry["score"] is None:
        raise UserError(f"step {step}'s run has no held-out score ({entry['status']}): run step {step} again")
    return entry


def _measuring(ws: Workspace, lessons: Lessons) -> tuple[dict, dict]:
    """As a measuring step starts: the runs it measures ({step: run}, for `Lessons.record`), and their listings."""
    lesson = lessons.read(ws)
    entries = {step: _trained(ws, lesson, step) for step in (1, 2)}
    return {step: e["name"] for step, e in entries.items()}, entries


def _accuracy(entry: dict) -> float:
    return 100 * entry["score"]


def band(accuracy: float) -> str:
    """The step-1 choice an accuracy (in %) falls in."""
    return [label for label, low in BANDS.items() if accuracy >= low][-1]


def compared(difference: float) -> str:
    """The step-2 choice a difference (LoRA-Diffusion minus weight LoRA, in points) falls in."""
    if difference > CLOSE:
        return COMPARED[0]
    return COMPARED[1] if difference >= -CLOSE else COMPARED[2]


def reveal_trained(ws: Workspace, lesson: dict) -> str:
    """Step 1: the default run's held-out accuracy, measured in this workspace, in its band."""
    ld = _trained(ws, lesson, 1)
    accuracy = _accuracy(ld)
    return (f"**Measured:** LoRA-Diffusion reached held-out {ld['metric']} **{accuracy:.1f}%** "
            f"(adapter `{ld['name']}`, {ld['trainable_parameters']:,} trainable parameters): *{band(accuracy)}*. "
            + _verdict(lesson["predictions"].get(1), band(accuracy)))


def reveal_compared(ws: Workspace, lesson: dict) -> str:
    """Step 2: both held-out scores side by side, and their difference against the prediction."""
    ld, lora = _trained(ws, lesson, 1), _trained(ws, lesson, 2)
    difference = _accuracy(ld) - _accuracy(lora)
    rows = "\n".join(f"| {NAMES[step]} | `{e['name']}` | {_accuracy(e):.1f}% | {e['trainable_parameters']:,} |"
                     for step, e in ((1, ld), (2, lora)))
    return (f"**Measured:** held-out {ld['metric']}: {NAMES[1]} **{_accuracy(ld):.1f}%**, {NAMES[2]} "
            f"**{_accuracy(lora):.1f}%**, a difference of **{difference:+.1f} points**: *{compared(difference)}*. "
            + _verdict(lesson["predictions"].get(2), compared(difference))
            + "\n\n| adapter | name | held-out score | trainable parameters |\n|---|---|---|---|\n" + rows
            + "\n\nThe same budget is the same training examples seen; the parameter counts differ.")


# ---- Step 3: the preset reviews through both adapters -----------------------------------

def _picked(reviews, who: str) -> list[str]:
    """The reviews ticked for one adapter (none ticked: none expected right)."""
    reviews = list(reviews or [])
    if any(r not in REVIEWS for r in reviews):
        raise UserError(f"tick reviews from the list for {who}")
    return reviews


@readable_errors
def decode_presets(ctx: Context, lessons: Lessons, user, expect_ld, expect_lora, progress=gr.Progress()):
    """Decode every preset review with both adapters, as the Generate tab does (from all-[MASK], greedy, the
    adapter's answer length); returns (status, the decodings as HTML)."""
    ws = user_workspace(ctx, user)
    prediction = {1: _picked(expect_ld, NAMES[1]), 2: _picked(expect_lora, NAMES[2])}
    runs, entries = _measuring(ws, lessons)
    answers, sections = {}, {text: [] for text in REVIEWS}
    for step, entry in entries.items():
        progress((step - 1, 2), desc=f"decoding the reviews with {NAMES[step]}")
        path = ws.adapter_path(entry["name"])
        model, length = load_model(path, base=ctx.base)[0], int(read_adapter_config(path)["response_length"])
        answers[step] = []
        for text in REVIEWS:
            report = denoising_trajectory(model, SENTIMENT_INSTRUCTION, text, length, length, 0.0, 0)
            answers[step].append(report["answer"])
            sections[text].append(generate_tab.trajectory_html(NAMES[step], report))
    page = generate_tab.LEGEND + "<hr>".join(f"<h3>{html.escape(text)}</h3>" + "".join(parts)
                                             for text, parts in sections.items())
    lessons.record(ws, 3, runs, predictions=prediction, measured={"adapters": runs, "answers": answers},
                   pages={"decodings": page})
    return f"decoded {len(REVIEWS)} reviews with both adapters: press Reveal", page


def reveal_presets(ws: Workspace, lesson: dict) -> str:
    """Step 3: each review's right answer, each adapter's, and the predictions ticked before the run."""
    measured = lesson["measured"].get(3)
    if measured is None:
        raise UserError("run step 3 first: it decodes the reviews")
    predicted = lesson["predictions"].get(3, {1: [], 2: []})
    rows, right, matched = [], {1: 0, 2: 0}, 0
    for i, (kind, text, label) in enumerate(PRESETS):
        cells = []
        for step in (1, 2):
            answer = measured["answers"][step][i]
            ok, expected = answer == label, text in predicted[step]
            right[step] += ok
            matched += ok == expected
            cells.append(f"{html.escape(answer) or '(empty)'} {'✓' if ok else '✗'} "
                         f"(you expected it {'right' if expected else 'wrong'})")
        rows.append(f"| {html.escape(text)} | {kind} | {label} | " + " | ".join(cells) + " |")
    n = len(PRESETS)
    return (f"**Measured:** {NAMES[1]} answered **{right[1]} of {n}** right, {NAMES[2]} **{right[2]} of {n}**. "
            f"Your ticks matched {matched} of {2 * n} answers.\n\n"
            f"| review | what it tests | right answer | {NAMES[1]} | {NAMES[2]} |\n|---|---|---|---|---|\n"
            + "\n".join(rows))


# ---- Step 4: effective rank per step, per phase -----------------------------------------

@readable_errors
def effective_rank(ctx: Context, lessons: Lessons, user, prediction, progress=gr.Progress()):
    """Effective rank per denoising step of both adapters, as the Analyse tab measures it; returns (the summary
    line, the figure)."""
    ws = user_workspace(ctx, user)
    prediction = _predicted(4, prediction)
    runs, entries = _measuring(ws, lessons)
    paths = [ws.adapter_path(e["name"], needs_task=True) for e in entries.values()]
    progress(0, desc="decoding held-out prompts with both adapters")
    report = effective_rank_report(paths, base=ctx.base, data_dir=ctx.data_dir, **ANALYSIS)
    figure = effective_rank_figure(report)
    measured = {step: {"name": e["name"], "t": row["t"], "effective_rank": row["effective_rank"]}
                for (step, e), row in zip(entries.items(), report["methods"])}
    lessons.record(ws, 4, runs, predictions=prediction, measured=measured, figures={"effective-rank": figure})
    return analyse_tab.rank_note(report, ANALYSIS["steps"]), figure


def _rank(value) -> str:
    return "no step" if value is None else f"{value:.1f}"


def reveal_rank(ws: Workspace, lesson: dict) -> str:
    """Step 4: the mean effective rank per phase of each adapter; LoRA-Diffusion's highest against the prediction."""
    measured = lesson["measured"].get(4)
    if measured is None:
        raise UserError("run step 4 first: it measures the effective rank")
    means = {step: phase_means(m["t"], m["effective_rank"]) for step, m in measured.items()}
    highest = max((p for p in PHASES if means[1][p] is not None), key=lambda p: means[1][p])
    rows = "\n".join(f"| {PHASE_CHOICES[p]} | {_rank(means[1][p])} | {_rank(means[2][p])} |" for p in PHASES)
    empty = [p for p in PHASES if means[1][p] is None]
    text = (f"**Measured:** LoRA-Diffusion's change has its highest effective rank in the **{highest}** phase "
            f"({means[1][highest]:.1f}). " + _verdict(lesson["predictions"].get(4), PHASE_CHOICES[highest])
            + f"\n\n| phase | {NAMES[1]} | {NAMES[2]} |\n|---|---|---|\n" + rows)
    if empty:
        steps = len(measured[1]["t"])
        text += (f"\n\nThe sampler took {steps} steps (at most one per answer position), so the {' and '.join(empty)} "
                 "phase had none. For a longer trajectory, train both methods on `suite_struct` in the Train tab "
                 "and compare them in the Analyse tab.")
    return text


# ---- Step 5: forgetting -----------------------------------------------------------------

@readable_errors
def forgetting(ctx: Context, lessons: Lessons, user, prediction, progress=gr.Progress()):
    """Held-out NELBO of ordinary text under the base and both adapters, as the Analyse tab measures it;
    returns (a line, the figure)."""
    ws = user_workspace(ctx, user)
    prediction = _predicted(5, prediction)
    runs, entries = _measuring(ws, lessons)
    paths = [ws.adapter_path(e["name"]) for e in entries.values()]
    progress(0, desc="scoring ordinary text under the base and both adapters")
    report = forgetting_report(paths, base=ctx.base, data_dir=ctx.data_dir, rows=FORGETTING_ROWS)
    figure = forgetting_figure(report)
    measured = {step: {"name": e["name"], "delta_nelbo": model["delta_nelbo"]}
                for (step, e), model in zip(entries.items(), report["models"][1:])}
    lessons.record(ws, 5, runs, predictions=prediction, measured=measured, figures={"forgetting": figure})
    return f"scored {FORGETTING_ROWS} rows of 128 tokens from each of: {', '.join(report['sources'])}", figure


def reveal_forgetting(ws: Workspace, lesson: dict) -> str:
    """Step 5: each adapter's change in held-out NELBO against the base (mean over the sources)."""
    measured = lesson["measured"].get(5)
    if measured is None:
        raise UserError("run step 5 first: it scores ordinary text")
    change = {step: sum(m["delta_nelbo"].values()) / len(m["delta_nelbo"]) for step, m in measured.items()}
    if max(change.values()) <= 0:
        answer = FORGOT[2]
    else:
        answer = FORGOT[0] if change[1] > change[2] else FORGOT[1]
    return (f"**Measured:** change in held-out NELBO against the base (nats per token, mean over the text "
            f"sources; above 0: worse than the base): {NAMES[1]} **{change[1]:+.3f}**, {NAMES[2]} "
            f"**{change[2]:+.3f}**: *{answer}*. " + _verdict(lesson["predictions"].get(5), answer))


REVEALS = {1: reveal_trained, 2: reveal_compared, 3: reveal_presets, 4: reveal_rank, 5: reveal_forgetting}


@readable_errors
def reveal(ctx: Context, lessons: Lessons, user, step) -> str:
    """The measured answer of step `step`, computed from what its run measured, next to the prediction."""
    ws = user_workspace(ctx, user)
    return REVEALS[_step(step)](ws, lessons.read(ws))


# ---- Instructor tools --------------------------------------------------------------------

def _loss_figure(ws: Workspace, lesson: dict, step: int) -> dict:
    """{"loss-curve": figure} of step `step`'s run, read back from its log ({} before the step has run)."""
    name = lesson["runs"].get(step)
    if not name:
        return {}
    job = ws.jobs.get(name)
    if job is not None and not job.finished:
        raise UserError(f"step {step}'s run is still {job.status}: export its figure when it is done")
    return {"loss-curve": training_figure(ws.curve(name), f"{NAMES[step]}: {name}")}


@readable_errors
def export(ctx: Context, lessons: Lessons, user, step):
    """Step `step`'s figures as self-contained HTML pages, and PNGs where kaleido can draw them
    (`Workspace.export_figures`, as every tab's Download figures), in the user's export folder, which gradio
    serves files from; step 3's decodings as their HTML page. Returns (the files, a line on what was written)."""
    ws, step = user_workspace(ctx, user), _step(step)
    lesson = lessons.read(ws)
    figures = {**lesson["figures"].get(step, {}), **(_loss_figure(ws, lesson, step) if step in TRAINED else {})}
    pages = lesson["pages"].get(step, {})
    if not figures and not pages:
        raise UserError(f"step {step} has no figures yet: run it first")
    # png=True: where kaleido (or a browser for it) is missing, the note says so in the library's words
    written, note = ws.export_figures({f"lesson-step-{step}-{stem}": f for stem, f in figures.items()}, png=True)
    for stem, page in pages.items():  # HTML already: written as a page beside the figures
        path = ws.exports() / "figures" / f"lesson-step-{step}-{stem}.html"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>Lesson step {step}</title>"
                         f"</head><body>{page}</body></html>")
        written.append(path)
    return [str(p) for p in written], f"step {step}: " + ", ".join(p.name for p in written) + (
        f" ({note})" if note else "")


RESET_LABEL = "yes, clear my workspace for the next group"


@readable_errors
def reset(ctx: Context, lessons: Lessons, user, confirmed):
    """Delete all of the user's runs and adapters (`Workspace.reset`, as the Train tab's reset) and start the
    lesson over, once `confirmed`; returns (message, the box unticked). A step still measuring is refused
    when it ends (`Lessons.record`)."""
    if confirmed is not True:
        raise UserError(f"tick '{RESET_LABEL}' first: this deletes all your adapters and runs")
    ws = user_workspace(ctx, user)
    removed = lessons.reset(ws, ws.reset)
    return f"deleted all your runs and adapters ({removed}); the lesson starts over", False


def emptied_page(count: int) -> list:
    """Every output of the lesson emptied, after a reset (predictions, statuses, plots, reveals, exports)."""
    return [None] * count


# ---- Layout ------------------------------------------------------------------------------

def _buttons(step: int, stop_button: bool = False) -> dict:
    with gr.Row():
        buttons = {"run": gr.Button(f"Run step {step}", variant="primary", elem_id=f"lesson-run-{step}")}
        if stop_button:
            buttons["stop"] = gr.Button(f"Stop step {step}", elem_id=f"lesson-stop-{step}")
        buttons["reveal"] = gr.Button(f"Reveal step {step}", elem_id=f"lesson-reveal-button-{step}")
        buttons["export"] = gr.Button(f"Export step {step}'s figures", elem_id=f"lesson-export-{step}")
    return buttons


def tab(ctx: Context, user) -> dict:
    """Lay out the Lesson tab and wire it; returns the events after which the page's adapter lists change."""
    explain.accordion(explain.LESSON_TAB)
    gr.Markdown(explain.LESSON_INTRO)
    lessons = Lessons()  # one for the app: every page of a user (a reload, a second tab) has the same lesson

    texts = {"n_reviews": len(PRESETS), **RUN}
    steps, changed, cleared = {}, [], []
    for step in range(1, STEPS + 1):
        with gr.Column():
            gr.Markdown(explain.LESSON_STEPS[step - 1].format(**texts))
            if step == 3:
                predict = [gr.CheckboxGroup(list(REVIEWS), elem_id=f"lesson-predict-3-{key}",
                                            **knob("Lesson", explain.LESSON_QUESTIONS[label]))
                           for key, label in (("ld", 3), ("lora", "3b"))]
            else:
                predict = [gr.Radio(list(CHOICES[step]), value=None, elem_id=f"lesson-predict-{step}",
                                    **knob("Lesson", explain.LESSON_QUESTIONS[step]))]
            buttons = _buttons(step, stop_button=step in TRAINED)
            status = gr.Markdown("", elem_id=f"lesson-status-{step}")
            if step == 3:
                with gr.Column():
                    shown = [gr.HTML(elem_id="lesson-decodings")]
                    explain.accordion(explain.TRAJECTORY)
            else:
                with gr.Row():
                    plot = gr.Plot(label=explain.LESSON_PLOTS[step], elem_id=f"lesson-plot-{step}")
                    with gr.Column():
                        metric = [gr.Markdown("", elem_id=f"lesson-metric-{step}")] if step in TRAINED else []
                        explain.accordion({1: explain.LOSS_PLOT, 2: explain.LOSS_PLOT, 4: explain.EFFECTIVE_RANK,
                                           5: explain.FORGETTING}[step])
                shown = [plot] + metric
            revealed = gr.Markdown("", elem_id=f"lesson-reveal-{step}")
            with gr.Row():
                exported = gr.File(label=f"step {step}'s figures", file_count="multiple", elem_id=f"lesson-file-{step}")
                export_note = gr.Markdown("", elem_id=f"lesson-export-note-{step}")
        number = gr.State(step)
        steps[step] = buttons
        cleared += predict + [status] + shown + [revealed, exported, export_note]
        if step in TRAINED:
            changed.append(buttons["run"].click(
                handler(train, ctx, lessons), [user, number] + predict, [status] + shown,
                api_visibility="undocumented", concurrency_limit=None))  # the workspace queues the runs
            buttons["stop"].click(handler(stop, ctx, lessons), [user, number], status, api_visibility="undocumented",
                                  concurrency_limit=None)
        else:
            run = {3: decode_presets, 4: effective_rank, 5: forgetting}[step]
            buttons["run"].click(handler(run, ctx, lessons), [user] + predict, [status] + shown,
                                 api_visibility="undocumented")
        buttons["reveal"].click(handler(reveal, ctx, lessons), [user, number], revealed, api_visibility="undocumented")
        buttons["export"].click(handler(export, ctx, lessons), [user, number], [exported, export_note],
                                api_visibility="undocumented")

    gr.Markdown(explain.LESSON_INSTRUCTOR)
    with gr.Row():
        confirm = gr.Checkbox(False, elem_id="lesson-reset-confirm", **knob("Lesson", RESET_LABEL))
        reset_btn = gr.Button("Reset for the next group", variant="stop", elem_id="lesson-reset")
    reset_msg = gr.Markdown("", elem_id="lesson-reset-message")
    emptied = reset_btn.click(handler(reset, ctx, lessons), [user, confirm], [reset_msg, confirm],
                              api_visibility="undocumented")
    # The page starts over too: every prediction, status, plot, reveal and export of the lesson is emptied.
    emptied.success(functools.partial(emptied_page, len(cleared)), None, cleared, api_visibility="undocumented")
    return {"changed": changed + [emptied], "steps": steps}
