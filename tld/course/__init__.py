"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

    python -m tld.course exercises            # write exercises/ from solutions/ (--check: only compare)
    python -m tld.course run --preset cpu     # run every lesson and solution with papermill into build/

``solutions/NN_topic.ipynb`` is the single source of the exercises (``tld.course.exercises``): in
its code cells the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become one
``raise NotImplementedError(...)``; in markdown cells the lines between ``<!-- BEGIN SOLUTION -->``
and ``<!-- END SOLUTION -->`` are dropped. Outputs are cleared.

Each lesson's tasks come in three tiers: *reproduce* what the lesson built, *extend* it with what
it did not write, *investigate* a measured question (the checker asserts the answer's range).
A learner checks a function with ``check_<task>(fn)`` (``tld.course.checks``, one module per
lesson): it runs real cases against ``tld``, smallest first, and when something differs raises
``CheckError`` (an ``AssertionError``) saying what in concepts: the shape, the largest error and
where it is, the property violated or the usual mistake recognised. Code-level hints come with
``check_<task>(fn, hint=2)`` or after ``CODE_HINTS_AFTER`` failures in a row; no hint prints the
answer. ``tld.course.run`` executes every notebook with papermill; ``tld.course.cli``
is the command line.
"""

from __future__ import annotations

from . import checks
from .checks import *  # noqa: F403 (CHECKERS, CODE_HINTS_AFTER, CheckError and every check_<task>: checks.__all__)
from .cli import main
from .exercises import BEGIN, END, MD_BEGIN, MD_END, REPO, exercise_notebook, exercise_source, write_exercises
from .run import PRESETS, format_table, lessons, run_course

__all__ = [
    "BEGIN", "END", "MD_BEGIN", "MD_END", "PRESETS", "REPO", "exercise_notebook", "exercise_source", "format_table",
    "lessons", "main", "run_course", "write_exercises", *checks.__all__,
]
