"""The learner's path: the lessons run against a pip-installed wheel, in a folder outside the repository.

    python -m tld.course run --installed              # every lesson; prints lesson | seconds | passed
    python -m tld.course run --installed --only 07,10

A wheel is built from this checkout and installed, non-editable, with the extras the Colab install
cell names (``INSTALL_EXTRAS``), into a fresh virtual environment. torch is installed first at this
machine's version (pip takes a local wheel when one is on disk, so nothing large is downloaded), then
the wheel and papermill's kernel. The lessons are copied to a temporary folder and run there with
that environment's Python and no ``PYTHONPATH``: so ``import tld`` can only find the installed
package, and the shipped models only as its package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .exercises import REPO
from .run import lessons, run_course

INSTALL_EXTRAS = "hub"   # what the install cell asks for on Colab (tld.course.colab.INSTALL_CELL)
RUNNER = ("papermill", "ipykernel")   # Colab and Jupyter have these; a bare venv does not


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def build_wheel(dest) -> Path:
    """A wheel of this checkout in ``dest`` (what ``pip install git+...`` builds on Colab)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # setuptools stages the package in build/lib and keeps files there that the checkout has since deleted (a
    # shipped model removed, say), which the wheel would then carry: start from an empty staging folder
    shutil.rmtree(REPO / "build" / "lib", ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building the wheel failed:\n{proc.stderr[-3000:]}")
    (wheel,) = dest.glob("tld_course-*.whl")
    return wheel


def make_env(venv, wheel: Path) -> Path:
    """A fresh venv with torch (this machine's version), the wheel with ``INSTALL_EXTRAS``, and a kernel."""
    venv = Path(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    _pip(python, f"torch=={torch.__version__.split('+')[0]}")   # first, so no other build is pulled in
    _pip(python, f"{wheel}[{INSTALL_EXTRAS}]", *RUNNER)
    return python


def learner_env(python: Path) -> dict:
    """The environment a learner's kernel has: the venv first on PATH, nothing pointing into the repo."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    return env


def run_installed(paths=None, work=None, preset: str = "cpu", timeout: int = 600, print_table: bool = True,
                  keep: bool = False) -> list[dict]:
    """Build, install, copy the lessons outside the repo and run them there; returns run_course's rows.

    Each row also says where ``tld`` was imported from (``tld_file``), read from the lesson's output.
    """
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="tld-installed-"))
    if REPO in work.resolve().parents or work.resolve() == REPO:
        raise ValueError(f"{work} is inside the repository {REPO}; the installed path runs outside it")
    try:
        python = make_env(work / "venv", build_wheel(work / "dist"))
        folder = work / "lessons"
        copies = []
        for path in (lessons() if paths is None else [Path(p) for p in paths]):
            dest = folder / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            copies.append(Path(shutil.copy(path, dest)))
        rows = run_course(preset, copies, work / "build", timeout, print_table=print_table, python=str(python),
                          env=learner_env(python))
        for row in rows:
            out = Path(row["output"])
            row["tld_file"] = _imported_from(out.read_text()) if out.is_file() else None
        return rows
    finally:
        if not keep:
            shutil.rmtree(work / "venv", ignore_errors=True)


def _imported_from(notebook_text: str) -> str | None:
    marker = " from "   # every lesson prints "tld <version> from <tld.__file__>"
    for line in notebook_text.replace("\\n", "\n").splitlines():
        if "| tld " in line and marker in line:
            return line.split(marker, 1)[1].strip().strip('",')
    return None
