"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

``python -m tld.course exercises [--check]``, ``python -m tld.course notebooks [--check]`` and
``python -m tld.course run [--preset ...] [--installed]``.
"""

from __future__ import annotations

import argparse

from .colab import sync_notebooks
from .exercises import REPO, write_exercises
from .installed import run_installed
from .run import PRESETS, lessons, run_course


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tld.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="write exercises/ from solutions/")
    ex.add_argument("--check", action="store_true", help="write nothing; fail if exercises/ is out of date")
    nbs = sub.add_parser("notebooks", help="write every notebook's Colab badge and install cell (tld.course.colab)")
    nbs.add_argument("--check", action="store_true", help="write nothing; fail if a notebook has drifted")
    rn = sub.add_parser("run", help="run every lesson and solution with papermill into build/")
    rn.add_argument("--preset", default="cpu", choices=PRESETS)
    rn.add_argument("--out", default=str(REPO / "build"))
    rn.add_argument("--only", default=None, help="comma-separated lesson numbers, e.g. 01,02")
    rn.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    rn.add_argument("--installed", action="store_true",
                    help="the learner's path: build a wheel, install it in a fresh venv, run the lessons outside "
                         "the repo (tld.course.installed)")
    args = parser.parse_args(argv)
    if args.command == "notebooks":
        changed = sync_notebooks(check=args.check)
        changed += write_exercises(check=args.check)
        for p in changed:
            print(f"{'out of date' if args.check else 'wrote'}: {p}")
        return 1 if args.check and changed else 0
    if args.command == "exercises":
        changed = write_exercises(check=args.check)
        if args.check:
            for p in changed:
                print(f"out of date: {p} (run `python -m tld.course exercises`)")
            return 1 if changed else 0
        print(f"wrote {len(changed)} exercise notebook(s)" + "".join(f"\n  {p}" for p in changed))
        return 0
    paths = lessons()
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        paths = [p for p in paths if p.name[:2] in keep]
    if args.installed:
        rows = run_installed(paths, preset=args.preset, timeout=args.timeout)
        for r in rows:
            print(f"{r['lesson']}: tld imported from {r['tld_file']}")
    else:
        rows = run_course(args.preset, paths, args.out, timeout=args.timeout)
    return 0 if all(r["passed"] for r in rows) else 1
