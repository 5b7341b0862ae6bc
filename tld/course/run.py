"""Whole-course runs: every lesson and solution notebook executed with papermill, and a table of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .exercises import REPO

PRESETS = ("smoke", "cpu", "colab")


def lessons(repo=REPO) -> list[Path]:
    """Every lesson notebook, then every solution notebook, in course order."""
    repo = Path(repo)
    return sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
        (repo / "solutions").glob("[0-9][0-9]_*.ipynb"))


def run_course(preset: str = "cpu", paths=None, out_dir=REPO / "build", timeout: int = 600,
               print_table: bool = True) -> list[dict]:
    """Execute each notebook with papermill into ``out_dir/<folder>/<name>``; return one row each.

    ``preset`` is passed only to notebooks whose parameters cell defines ``preset``. A failing
    notebook is recorded (passed False, with its error) and the run goes on.
    """
    import papermill

    paths = lessons() if paths is None else [Path(p) for p in paths]
    out_dir = Path(out_dir)
    rows = []
    for path in paths:
        params = papermill.inspect_notebook(str(path))
        parameters = {"preset": preset} if "preset" in params else {}
        out = out_dir / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        error = None
        try:
            papermill.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                                       progress_bar=False, kernel_name="python3", execution_timeout=timeout)
        except Exception as e:  # a failed lesson is a row of the table, not the end of the run
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        rows.append({"lesson": f"{path.parent.name}/{path.name}", "seconds": round(time.perf_counter() - t0, 1),
                     "passed": error is None, "preset": parameters.get("preset", "-"), "error": error,
                     "output": str(out)})
        if print_table:
            print(f"{rows[-1]['lesson']:<48} {rows[-1]['seconds']:>8.1f}  {'yes' if error is None else 'NO'}",
                  flush=True)
    if print_table:
        print()
        print(format_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "course.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table: lesson | seconds | passed (with the error of each failure below it)."""
    lines = ["| lesson | seconds | passed |", "|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['lesson']} | {r['seconds']:.1f} | {'yes' if r['passed'] else 'NO'} |")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"| **total** ({sum(r['passed'] for r in rows)}/{len(rows)} passed) | {total:.1f} | |")
    for r in rows:
        if not r["passed"]:
            lines.append(f"\n{r['lesson']}: {r['error']}  (see {r['output']})")
    return "\n".join(lines)
