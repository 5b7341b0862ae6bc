"""Graded hints of the lesson 14 and 15 checkers: the first failure speaks in concepts, code-level hints come
with ``hint=2`` or after repeated failures, and no message ever holds a line of the solution."""

import re
from pathlib import Path

import nbformat
import pytest
import torch

from tld.course import CHECKERS, CheckError
from tld.course.checks import l14_guidance_editing

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("14_guidance_and_editing.ipynb", "15_flow_matching.ipynb")
TASKS = ("classifier_guided", "fixed_point_inversion_step", "round_trip_error", "heun_step", "midpoint_step",
         "path_straightness")


def _functions(path: Path) -> dict:
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    ns: dict = {}
    imports = next(c for c in cells if c.source.lstrip().startswith(("import", "from")))
    exec(compile(imports.source, f"{path.name}:imports", "exec"), ns)
    for c in cells:
        if re.search(r"^\s*def \w+", c.source, re.M) and ("BEGIN SOLUTION" in c.source or "NotImplementedError" in c.source):
            exec(compile(c.source, f"{path.name}:task", "exec"), ns)
    calls = re.findall(r"^check_(\w+)\((\w+)\)", "\n".join(c.source for c in cells), re.M)
    return {task: ns[fn] for task, fn in calls}


def _solution_lines() -> set:
    lines = set()
    for name in NOTEBOOKS:
        for cell in nbformat.read(REPO / "solutions" / name, as_version=4).cells:
            inside = False
            for line in cell.source.split("\n"):
                if "# BEGIN SOLUTION" in line:
                    inside = True
                elif "# END SOLUTION" in line:
                    inside = False
                elif inside and len(line.strip()) >= 8:
                    lines.add(line.strip())
    return lines


STUBS = {t: f for n in NOTEBOOKS for t, f in _functions(REPO / "exercises" / n).items()}
SOLVED = {t: f for n in NOTEBOOKS for t, f in _functions(REPO / "solutions" / n).items()}


def _returns_input_denoiser(denoiser, log_prob, scale, schedule):   # guidance forgotten altogether
    return denoiser


# answers that reach each checker's general (last) hint, which has a code-level part where the task has one
VAGUE = {
    "classifier_guided": lambda den, lp, scale, sched: (lambda x, t: (den(x, t)[0] * 1.5, den(x, t)[1])),
    "fixed_point_inversion_step": lambda den, x_u, t_u, t_v, sched, iters: 1.1 * x_u + 0.01,
    "round_trip_error": lambda model, x0, sched, steps, prediction, iters: 0.5,
    "heun_step": lambda velocity, x, t, s: x + 0.3,
    "midpoint_step": lambda velocity, x, t, s: x + 0.3,
    "path_straightness": lambda traj: torch.full((traj[0].shape[0],), 0.5, dtype=torch.float64),
}
PLAUSIBLE = {
    "classifier_guided": _returns_input_denoiser,
    "fixed_point_inversion_step": lambda den, x_u, t_u, t_v, sched, iters: x_u,
    "round_trip_error": lambda model, x0, sched, steps, prediction, iters: 0.0,
    "heun_step": lambda velocity, x, t, s: x + (s - t) * velocity(x, t),
    "midpoint_step": lambda velocity, x, t, s: x + (s - t) * velocity(x, t),
    "path_straightness": lambda traj: torch.ones(traj[0].shape[0], dtype=torch.float64),
}


def _message(task, fn, **kw) -> str:
    with pytest.raises(CheckError) as info:
        CHECKERS[task](fn, **kw)
    return str(info.value)


@pytest.fixture(autouse=True)
def _fresh_counts():
    l14_guidance_editing._FAILURES.clear()
    yield
    l14_guidance_editing._FAILURES.clear()


def test_every_new_task_has_a_solution_and_a_stub():
    assert set(TASKS) <= set(CHECKERS) and set(TASKS) == set(SOLVED) == set(STUBS)


@pytest.mark.parametrize("task", TASKS)
def test_no_message_holds_a_line_of_the_solution(task):
    solution = _solution_lines()
    for fn in (STUBS[task], PLAUSIBLE[task], VAGUE[task]):
        for hint in (1, 2):
            msg = _message(task, fn, hint=hint)
            leaked = [line for line in solution if line in msg]
            assert not leaked, (task, leaked, msg)


@pytest.mark.parametrize("task", TASKS)
def test_first_failure_is_conceptual_and_code_comes_when_asked(task):
    first = _message(task, VAGUE[task])
    assert first.startswith(f"check_{task}: ") and "\n  on " in first and "hint: " in first, first
    assert "code hint:" not in first, first
    l14_guidance_editing._FAILURES.clear()
    asked = _message(task, VAGUE[task], hint=2)
    if f"check_{task}(fn, hint=2)" in first:   # the task has a code-level hint: it comes when asked
        assert "code hint:" in asked, asked


def test_code_hint_comes_by_itself_after_repeated_failures():
    msgs = [_message("heun_step", VAGUE["heun_step"]) for _ in range(3)]
    assert "code hint:" not in msgs[0] and "code hint:" not in msgs[1] and "code hint:" in msgs[2], msgs


def test_plausible_mistakes_get_their_own_conceptual_diagnosis():
    words = {"classifier_guided": "never reached", "fixed_point_inversion_step": "never left",
             "round_trip_error": "zero", "heun_step": "Euler", "midpoint_step": "Euler",
             "path_straightness": "every segment"}
    for task, word in words.items():
        msg = _message(task, PLAUSIBLE[task])
        assert word in msg, (task, msg)


@pytest.mark.parametrize("task", TASKS)
def test_solution_passes_and_resets_the_count(task, capsys):
    CHECKERS[task](SOLVED[task])
    assert f"✓ check_{task}:" in capsys.readouterr().out
    assert task not in l14_guidance_editing._FAILURES
