"""Exercises from solutions: ``solutions/NN_topic.ipynb`` is the single source of ``exercises/``.

In a solution's code cells the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become one
``raise NotImplementedError(...)`` at the indentation of the ``# BEGIN SOLUTION`` line; in markdown
cells the lines between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` are dropped.
Outputs are cleared.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"


def _task_name(lines: list[str], begin: int, indent: int) -> str | None:
    """The function a solution block sits in: the nearest `def` above it, less indented."""
    for line in reversed(lines[:begin]):
        m = re.match(r"(\s*)def (\w+)", line)
        if m and len(m.group(1)) < indent:
            return m.group(2)
    return None


def exercise_source(src: str, where: str = "cell") -> str:
    """Replace every ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block of code with a stub.

    The stub sits at the indentation of the ``# BEGIN SOLUTION`` line, so a block inside a
    function body stays valid Python. Unbalanced or nested markers are an error naming ``where``.
    """
    lines = src.split("\n")
    out, begin = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if begin is not None:
                raise ValueError(f"{where}, line {i + 1}: '{BEGIN}' inside another solution block "
                                 f"(opened at line {begin + 1}); close it with '{END}' first")
            begin = i
            indent = len(line) - len(line.lstrip())
            name = _task_name(lines, i, indent)
            what = f"write {name}" if name else "fill in this part"
            out.append(" " * indent + f'raise NotImplementedError("exercise: {what}")')
        elif stripped.startswith(END):
            if begin is None:
                raise ValueError(f"{where}, line {i + 1}: '{END}' without a '{BEGIN}' before it")
            begin = None
        elif begin is None:
            out.append(line)
    if begin is not None:
        raise ValueError(f"{where}, line {begin + 1}: '{BEGIN}' is never closed with '{END}'")
    return "\n".join(out)


def _markdown_exercise(src: str, where: str) -> str:
    out, inside = [], False
    for i, line in enumerate(src.split("\n")):
        if line.strip() == MD_BEGIN:
            if inside:
                raise ValueError(f"{where}, line {i + 1}: nested '{MD_BEGIN}'")
            inside = True
        elif line.strip() == MD_END:
            if not inside:
                raise ValueError(f"{where}, line {i + 1}: '{MD_END}' without '{MD_BEGIN}'")
            inside = False
        elif not inside:
            out.append(line.replace("/blob/main/solutions/", "/blob/main/exercises/"))
    if inside:
        raise ValueError(f"{where}: '{MD_BEGIN}' is never closed")
    return "\n".join(out)


def exercise_notebook(nb, name: str = "notebook"):
    """A copy of solution notebook ``nb`` (nbformat) with the solutions stubbed and outputs cleared."""
    nb = copy.deepcopy(nb)
    n_blocks = 0
    for k, cell in enumerate(nb.cells):
        where = f"{name}, cell {k}"
        if cell.cell_type == "code":
            n_blocks += sum(line.strip().startswith(BEGIN) for line in cell.source.split("\n"))
            cell.source = exercise_source(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown":
            cell.source = _markdown_exercise(cell.source, where)
    if not n_blocks:
        raise ValueError(f"{name} has no '{BEGIN}' block: nothing to turn into an exercise")
    return nb


def write_exercises(solutions_dir=REPO / "solutions", exercises_dir=REPO / "exercises",
                    check: bool = False) -> list[Path]:
    """Write ``exercises/NN_topic.ipynb`` for every ``solutions/NN_topic.ipynb``.

    With ``check=True`` write nothing and return the exercises that are missing or differ.
    """
    import nbformat

    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    paths = sorted(solutions_dir.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no solution notebooks (NN_topic.ipynb) in {solutions_dir}")
    changed = []
    for path in paths:
        nb = exercise_notebook(nbformat.read(path, as_version=4), path.name)
        text = nbformat.writes(nb) + "\n"
        out = exercises_dir / path.name
        if out.is_file() and out.read_text() == text:
            continue
        changed.append(out)
        if not check:
            exercises_dir.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    return changed
