"""Where the course lives, and the two cells every notebook opens with: its Colab badge and its install cell.

``REPOSITORY`` is the one place the repository is named. ``python -m tld.course notebooks`` writes the
badge (first line of the first cell) and the install cell (the second cell) of every lesson and
solution from it, then regenerates the exercises from the solutions; ``--check`` (and the test suite) fails when a notebook has drifted.

The install cell, on Colab, installs the package with the ``hub`` extra (the tokenizer and the VAE the
lessons use) and leaves torch and ipywidgets as Colab ships them: torch is already satisfied, and
ipywidgets is no dependency (Colab renders ipywidgets 7.7.1 natively; 8 needs its custom widget
manager). Anywhere else (Jupyter, VS Code, papermill) it installs nothing and, when tld is missing,
says how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .exercises import REPO

REPOSITORY = "tld-course/tld"   # owner/name on GitHub
BRANCH = "main"
URL = f"https://github.com/{REPOSITORY}"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"

INSTALL_CELL = f"""\
# Install: on Colab, the course package with what the lessons use (torch and ipywidgets stay as Colab
# ships them). Anywhere else this cell installs nothing; it says how when tld is missing.
import importlib
import importlib.util
import subprocess
import sys

URL = "{URL}"
if importlib.util.find_spec("tld") is None:
    if "google.colab" in sys.modules:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"tld-course[hub] @ git+{{URL}}"], check=True)
        importlib.invalidate_caches()
    else:
        print(f"tld is not installed: in a clone of {{URL}}, run `make lab`; "
              f"elsewhere: pip install 'tld-course[hub,lab] @ git+{{URL}}'")"""

FOLDERS = ("notebooks", "solutions")   # exercises/ copies the solutions' cells (python -m tld.course exercises)


def badge(relpath: str) -> str:
    """The Colab badge line of the notebook at ``relpath`` (e.g. ``notebooks/07_samplers.ipynb``)."""
    return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{relpath})"


def _lines(text: str) -> list[str]:
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + [parts[-1]]


def synced(nb: dict, relpath: str) -> dict:
    """``nb`` with its badge and install cell as they should be (the rest untouched)."""
    cells = nb["cells"]
    if len(cells) < 2 or cells[0]["cell_type"] != "markdown" or cells[1]["cell_type"] != "code":
        raise ValueError(f"{relpath}: a lesson opens with a markdown cell (the badge and title), then the "
                         "install cell")
    first = "".join(cells[0]["source"]).split("\n")
    body = first[1:] if first[0].startswith("[![Open In Colab]") else ["", *first]
    cells[0]["source"] = _lines("\n".join([badge(relpath), *body]))
    cells[1]["source"] = _lines(INSTALL_CELL)
    return nb


def notebook_paths(repo=REPO) -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((Path(repo) / folder).glob("[0-9][0-9]_*.ipynb"))]


def sync_notebooks(repo=REPO, check: bool = False) -> list[Path]:
    """Write every notebook's badge and install cell; returns the notebooks that were (or would be) changed."""
    changed = []
    for path in notebook_paths(repo):
        text = path.read_text(encoding="utf-8")
        nb = synced(json.loads(text), path.relative_to(repo).as_posix())
        new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    return changed
