"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

``python -m tld.course exercises [--check]`` and ``python -m tld.course run [--preset ...]``.
"""

from __future__ import annotations

import argparse

from .exercises import REPO, write_exercises
from .run import PRESETS, lessons, run_course


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tld.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="write exercises/ from solutions/")
    ex.add_argument("--check", action="store_true", help="write nothing; fail if exercises/ is out of date")
    rn = sub.add_parser("run", help="run every lesson and solution with papermill into build/")
    rn.add_argument("--preset", default="cpu", choices=PRESETS)
    rn.add_argument("--out", default=str(REPO / "build"))
    rn.add_argument("--only", default=None, help="comma-separated lesson numbers, e.g. 01,02")
    rn.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
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
    rows = run_course(args.preset, paths, args.out, timeout=args.timeout)
    return 0 if all(r["passed"] for r in rows) else 1
