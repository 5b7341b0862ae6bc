"""Print `name==floor` for every dependency whose declared minimum `make test-oldest` tests.

Reads pyproject.toml's [project] dependencies and the hub, lab and dev extras, and prints one
pin per requirement that has a `>=` floor. torch is skipped: its floor has no CPU wheel on PyPI
(only multi-GB CUDA builds), so the oldest-deps run keeps the machine's torch (TORCH_SPEC).
Requirements without a floor (pytest-timeout) and the extra's self-reference are skipped too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: tomli if installed, else the copy every pip carries
    try:
        import tomli as tomllib
    except ImportError:
        from pip._vendor import tomli as tomllib

EXTRAS = ("hub", "lab", "dev")
SKIP = {"torch", "tld-course"}
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(?:;.*)?$")


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    pins, seen = [], set()
    for req in reqs:
        m = FLOOR.match(req)
        if not m:
            continue
        name, version = m.group(1), m.group(2)
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in SKIP or key in seen:
            continue
        seen.add(key)
        pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml")))
