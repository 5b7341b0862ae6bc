"""Whole-course runs: every lesson and solution notebook executed with papermill, and a table of them."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from .exercises import REPO

PRESETS = ("smoke", "cpu", "colab")


def lessons(repo=REPO) -> list[Path]:
    """Every lesson notebook, then every solution notebook, in course order."""
    repo = Path(repo)
    return sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
        (repo / "solutions").glob("[0-9][0-9]_*.ipynb"))


BUDGET_S = 120   # every lesson and solution runs in under 2 minutes here at its defaults


def run_course(preset: str = "cpu", paths=None, out_dir=REPO / "build", timeout: int = 600,
               print_table: bool = True, python: str | None = None, cwd=None, env: dict | None = None) -> list[dict]:
    """Execute each notebook with papermill into ``out_dir/<folder>/<name>``; return one row each.

    ``preset`` is passed only to notebooks whose parameters cell defines ``preset``. A failing
    notebook is recorded (passed False, with its error) and the run goes on. A lesson that takes
    longer than ``BUDGET_S`` is flagged in its row and in the table: that table is the lessons'
    speed check (seconds include starting the kernel).

    ``python``: run papermill (and so the kernel) with this interpreter instead of in this process,
    from folder ``cwd`` with environment ``env`` (the learner's path: ``tld.course.installed``).
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
        if python is None:
            error = _run_here(path, out, parameters, timeout)
        else:
            error = _run_with(python, path, out, parameters, timeout, cwd or path.parent, env)
        seconds = round(time.perf_counter() - t0, 1)
        rows.append({"lesson": f"{path.parent.name}/{path.name}", "seconds": seconds, "passed": error is None,
                     "over_budget": seconds > BUDGET_S, "preset": parameters.get("preset", "-"), "error": error,
                     "output": str(out)})
        if print_table:
            flag = f"  over the {BUDGET_S} s budget" if seconds > BUDGET_S else ""
            print(f"{rows[-1]['lesson']:<48} {seconds:>8.1f}  {'yes' if error is None else 'NO'}{flag}", flush=True)
    if print_table:
        print()
        print(format_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "course.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _run_here(path: Path, out: Path, parameters: dict, timeout: int) -> str | None:
    import papermill

    try:
        papermill.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                                   progress_bar=False, kernel_name="python3", execution_timeout=timeout)
    except Exception as e:  # a failed lesson is a row of the table, not the end of the run
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return None


def _run_with(python: str, path: Path, out: Path, parameters: dict, timeout: int, cwd, env) -> str | None:
    cmd = [python, "-m", "papermill", str(path), str(out), "--cwd", str(cwd), "--no-progress-bar",
           "-k", "python3", "--execution-timeout", str(timeout)]
    for k, v in parameters.items():
        cmd += ["-p", k, str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd))
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return f"exit {proc.returncode}: {lines[-1] if lines else ''}"


def format_table(rows: list[dict]) -> str:
    """A markdown table: lesson | seconds (flagged over the budget) | passed, each failure's error below it."""
    lines = ["| lesson | seconds | passed |", "|---|---:|---|"]
    for r in rows:
        over = f" (over {BUDGET_S} s)" if r.get("over_budget") else ""
        lines.append(f"| {r['lesson']} | {r['seconds']:.1f}{over} | {'yes' if r['passed'] else 'NO'} |")
    total = sum(r["seconds"] for r in rows)
    n_over = sum(bool(r.get("over_budget")) for r in rows)
    lines.append(f"| **total** ({sum(r['passed'] for r in rows)}/{len(rows)} passed, {n_over} over {BUDGET_S} s) "
                 f"| {total:.1f} | |")
    for r in rows:
        if not r["passed"]:
            lines.append(f"\n{r['lesson']}: {r['error']}  (see {r['output']})")
    return "\n".join(lines)
