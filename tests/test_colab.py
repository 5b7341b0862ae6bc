"""The course runs where learners are: one install cell and one badge per notebook, written from one
place; the shipped models found as package data; the learner's path (a wheel, outside the repo) tested."""

from __future__ import annotations

import json
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest

from tld import assets
from tld.course import colab
from tld.course.installed import build_wheel, run_installed

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [p for folder in ("notebooks", "solutions", "exercises")
             for p in sorted((REPO / folder).glob("[0-9][0-9]_*.ipynb"))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_opens_with_its_badge_and_the_one_install_cell(path):
    cells = json.loads(path.read_text())["cells"]
    assert "".join(cells[0]["source"]).split("\n")[0] == colab.badge(path.relative_to(REPO).as_posix())
    assert "".join(cells[1]["source"]) == colab.INSTALL_CELL


def test_the_notebooks_are_in_sync_with_tld_course_colab():
    assert colab.sync_notebooks(check=True) == [], "run `python -m tld.course notebooks`"


def test_the_repository_is_named_in_one_place():
    # every github / colab link in the notebooks and the README points at colab.REPOSITORY
    found = set()
    for path in [*NOTEBOOKS, REPO / "README.md"]:
        found |= set(re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+?)(?:/blob|\.git|\"|'|\)|/|\s|$)", path.read_text()))
    ours = {r for r in found if r.startswith("tld-course/")}
    assert ours == {colab.REPOSITORY}, ours


def run_install_cell(monkeypatch, on_colab: bool, installed: bool):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if installed else None)
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab.INSTALL_CELL, {})
    return calls


def test_the_install_cell_installs_the_hub_extra_on_colab_only_and_never_torch_or_ipywidgets(monkeypatch, capsys):
    (cmd,) = run_install_cell(monkeypatch, on_colab=True, installed=False)
    assert cmd[1:4] == ["-m", "pip", "install"] and f"tld-course[hub] @ git+{colab.URL}" in cmd
    assert not any(w.startswith(("torch", "ipywidgets")) or "upgrade" in w for w in cmd), cmd
    assert run_install_cell(monkeypatch, on_colab=True, installed=True) == []     # once per session
    assert run_install_cell(monkeypatch, on_colab=False, installed=False) == []   # elsewhere: only says how
    assert "make lab" in capsys.readouterr().out
    assert run_install_cell(monkeypatch, on_colab=False, installed=True) == []


def test_ipywidgets_is_not_a_base_dependency_and_lab_is_in_the_extra_make_installs():
    text = (REPO / "pyproject.toml").read_text()
    base = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "ipywidgets" not in base and "torch>=" in base
    assert re.search(r'^lab = \[.*jupyterlab.*ipywidgets', text, re.M)
    assert '"tld-course[hub,lab]"' in text and ".[dev]" in (REPO / "Makefile").read_text()


def test_shipped_models_are_found_by_name_and_a_missing_one_says_how_to_get_it(tmp_path, monkeypatch):
    for name in assets.SHIPPED:
        assert (assets.path(name) / "README.md").is_file()
    assert assets.resolve("shapes-cond") == assets.path("shapes-cond")
    assert assets.resolve(tmp_path) == tmp_path   # a folder is a folder
    # a folder inside a shipped model, from any working directory (presets name the shipped codec so)
    monkeypatch.chdir(tmp_path)
    assert assets.resolve("shapes-t2i/codec") == assets.path("shapes-t2i") / "codec"
    assert (assets.resolve("shapes-t2i/codec") / "tld_codec.json").is_file()
    assert assets.resolve("elsewhere/codec") == Path("elsewhere/codec")   # not a shipped name: a path as given
    with pytest.raises(ValueError, match="unknown shipped model 'nope'"):
        assets.path("nope")
    monkeypatch.setattr(assets, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'shapes-t2i'.*reinstall"):
        assets.path("shapes-t2i")


@pytest.mark.slow
def test_the_wheel_carries_the_shipped_models(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in assets.SHIPPED:
        shipped = {p.relative_to(assets.ROOT).as_posix() for p in assets.path(name).rglob("*") if p.is_file()}
        assert {f"tld/assets/{p}" for p in shipped} <= names, name
    assert wheel.stat().st_size < 20e6


@pytest.mark.slow
def test_lessons_07_10_13_run_from_an_installed_wheel_outside_the_repo(tmp_path):
    paths = [next((REPO / "notebooks").glob(f"{n}_*.ipynb")) for n in ("07", "10", "13")]
    rows = run_installed(paths, work=tmp_path / "learner", print_table=False)
    for row in rows:
        assert row["passed"], row
        assert "site-packages" in (row["tld_file"] or "") and str(REPO) not in row["tld_file"], row
        printed = "".join("".join(o.get("text", "")) for c in json.loads(Path(row["output"]).read_text())["cells"]
                          for o in c.get("outputs", []))   # what the lesson printed, not its source
        assert "not installed" not in printed and "not asserted" not in printed, row["lesson"]
