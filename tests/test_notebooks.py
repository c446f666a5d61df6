"""Every teaching notebook runs top to bottom (nbclient) on a tiny random base with a few steps,
teaches in the same shape (goals, predictions, an exercise with its check, what we learned), and
its check catches a known wrong answer."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The exercise's one line the student writes: `name = solution  # your answer`.
ANSWER = re.compile(r"^(?P<name>\w+) = (?P<solution>.+?)  # your answer$", re.MULTILINE)
# Per lesson, a mistake a student could make, in place of the shipped solution.
WRONG = {
    "01_quickstart": "trained / base_total",  # a fraction, not a percentage
    "02_effective_rank": "float(torch.linalg.matrix_rank(weighted))",  # the rank, not the effective rank
    "03_trajectory_tsne": "x @ np.linalg.svd(x, full_matrices=False)[2][:2].T",  # PCA without centring
    # the mean over every instruction, not only the unseen ones
    "04_router_composition": "sum(w['weights'][report['tasks'].index(w['task'])] for w in report['router_weights'])"
                             " / len(report['router_weights'])",
    # a whole d_out x d_in matrix per adapted weight and rank
    "05_baselines_and_rank_scaling": "{r: sum(r * w.in_features * w.out_features for w in adapted.values()) "
                                     "for r in ranks_w.value}",
}


@pytest.fixture(scope="module")
def lessons_cache(tmp_path_factory):
    """One lessons cache for the module: the adapters a notebook trains are reused by the next one."""
    return tmp_path_factory.mktemp("lessons")


@pytest.fixture(scope="module", params=NOTEBOOKS, ids=lambda p: p.stem)
def lesson(request, tiny_base_dir, lessons_cache, tmp_path_factory):
    """The notebook run top to bottom in one kernel, then, in the same kernel, its exercise with a
    known wrong answer and the check after it: (executed notebook, the wrong answer's error or None)."""
    path = request.param
    notebook = nbformat.read(path, as_version=4)
    exercise, check = exercise_and_check(notebook)
    with pytest.MonkeyPatch.context() as env:
        # The kernel inherits these: the tiny base stands in for the shipped one, a few steps each,
        # one thread (the fastest for a tiny model's matrices).
        env.setenv("LORA_DIFFUSION_BASE", str(tiny_base_dir))
        env.setenv("LORA_DIFFUSION_LESSONS", str(lessons_cache))
        env.setenv("NOTEBOOK_STEPS", "4")
        env.setenv("OMP_NUM_THREADS", "1")
        env.delenv("LORA_DIFFUSION_DATA", raising=False)
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path_factory.mktemp(path.stem))}})
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
            wrong = [nbformat.from_dict(dict(notebook.cells[i], outputs=[])) for i in (exercise, check)]
            answer = ANSWER.search(wrong[0].source)
            wrong[0].source = wrong[0].source.replace(
                answer.group(0), f"{answer['name']} = {WRONG[path.stem]}  # a wrong answer")
            error = None
            for which, (cell, index) in enumerate(zip(wrong, (exercise, check))):
                try:
                    client.execute_cell(cell, index)
                except nbclient.exceptions.CellExecutionError as err:
                    error = (err, "exercise" if which == 0 else "check")
                    break
    return notebook, error


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def exercise_and_check(notebook) -> tuple[int, int]:
    """Indices of the exercise cell (the one with an answer line) and of the check cell after it."""
    exercises = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and ANSWER.search(cell.source)]
    assert len(exercises) == 1, "one exercise cell with one `name = ...  # your answer` line"
    i = exercises[0]
    assert notebook.cells[i].source.startswith("# Exercise:") and len(ANSWER.findall(notebook.cells[i].source)) == 1
    check = i + 1
    assert notebook.cells[check].cell_type == "code" and notebook.cells[check].source.startswith("# Check:")
    return i, check


def test_there_are_five_lessons():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    assert sorted(WRONG) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_lesson_teaches_in_the_same_shape(path):
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    assert "## Learning goals" in cells[1].source, "goals come right after the title"
    assert any("**Predict.**" in cell.source for cell in cells if cell.cell_type == "markdown")
    exercise, _ = exercise_and_check(notebook)
    predictions = [i for i, cell in enumerate(cells) if "**Predict.**" in cell.source]
    assert predictions[0] < exercise, "a prediction comes before the experiment"
    # What we learned is the last cell, and code: its numbers are computed, never typed in.
    assert cells[-1].cell_type == "code" and cells[-1].source.startswith("# What we learned")
    assert "### What we learned" in cells[-1].source


def test_notebook_runs_top_to_bottom(lesson):
    notebook, _ = lesson
    outputs = [o for cell in code_cells(notebook) for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Every lesson shows at least one plotly figure or a table, made by the library.
    rich = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")
            and ("application/vnd.plotly.v1+json" in o.get("data", {}) or "text/markdown" in o.get("data", {}))]
    assert rich, "no figure or table"
    # ... and checks values it computed: its check cells assert, and each one ran to its last line.
    checks = [cell for cell in code_cells(notebook) if cell.source.startswith("# Check:")]
    assert checks and all("assert " in cell.source for cell in checks), "no check cell"
    for cell in checks:
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        assert "check passed" in printed, cell.source
    # What we learned came out as markdown holding the numbers just computed.
    learned = [o["data"]["text/markdown"] for o in notebook.cells[-1].get("outputs", [])
               if "text/markdown" in o.get("data", {})]
    assert len(learned) == 1 and "What we learned" in learned[0] and re.search(r"\d", learned[0])


def test_a_known_wrong_answer_fails_the_check(lesson):
    _, error = lesson
    assert error is not None, "the check passed a wrong answer"
    err, cell = error
    assert cell == "check" and err.ename == "AssertionError", f"the {cell} cell failed with {err.ename}"


def test_the_timing_command_writes_the_seconds_of_each_notebook(tmp_path):
    out = tmp_path / "timings.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_DIFFUSION_")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "time_notebooks.py"), "--fast",
                           "--only", "02_effective_rank", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**env, "OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    (row,) = report["notebooks"]
    assert row["notebook"] == "02_effective_rank" and row["error"] is None and row["seconds"] > 0, done.stderr
    assert row["cache_warm_before"] is False and report["cache_warm_at_start"] is False  # a throwaway cache
    assert report["notebook_steps"] == "4" and report["goal_seconds"] == 180 and report["machine"]["cpu_count"] >= 1
    assert done.returncode == (0 if row["within_goal"] else 1)
