"""Course conventions for every lesson, and one papermill run with a parameter override.

nbval runs each notebook top to bottom (``pytest --nbval-lax notebooks``); these tests check what
nbval cannot: the cells every lesson must have, and that papermill can drive a lesson.
"""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LESSONS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def test_there_are_lessons():
    names = [p.name[:2] for p in LESSONS]
    assert {"00", "01", "02", "03", "04"} <= set(names), names


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: p.name)
def test_lesson_follows_the_course_conventions(path):
    cs = cells(path)
    text = "\n".join(source(c) for c in cs)
    if path.parent.name == "notebooks":
        assert "colab.research.google.com" in source(cs[0]), "first cell: title and Colab badge"
        assert path.name in source(cs[0]), "the Colab badge must point at this notebook"
        assert "google.colab" in text, "an install cell for Colab"
    tagged = [c for c in cs if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill drives it)"
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cs if c["cell_type"] == "code"), \
        "outputs must not be committed"
    assert "assert" in text or "check_" in text, "a lesson asserts its claims"
    assert "pip install torch" not in text and "torchvision" not in text


def test_papermill_runs_a_lesson_with_a_parameter_override(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    # the kernel inherits the environment: MPLBACKEND=Agg would stop inline pictures
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = tmp_path / "00.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks/00_setup_and_data.ipynb"), str(out),
                               parameters={"size": 16, "seed": 3}, cwd=str(REPO / "notebooks"),
                               progress_bar=False, kernel_name="python3")
    run = json.loads(out.read_text())["cells"]
    injected = [c for c in run if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert injected and "size = 16" in source(injected[0])
    outputs = json.dumps([c.get("outputs", []) for c in run])
    assert "image/png" in outputs, "the lesson draws pictures"


@pytest.mark.slow
def test_papermill_runs_the_full_training_lesson_as_a_text_to_image_run(tmp_path, monkeypatch):
    """Lesson 12's text path: encoders trained, data cached, model trained, pipeline scored."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    out = tmp_path / "12.ipynb"
    extra = ["conditioning=text", "text_encoder=tinyclip", "encoder_steps=5", "codec=tiny-vae", "vae_steps=5",
             "cache_items=64", "max_steps=10", "log_every=5"]
    papermill.execute_notebook(str(REPO / "notebooks/12_full_training_run.ipynb"), str(out),
                               parameters={"preset": "smoke", "extra": extra, "sample_steps": 2,
                                           "out_dir": str(tmp_path / "run")},
                               cwd=str(REPO / "notebooks"), progress_bar=False, kernel_name="python3")
    text = json.dumps([c.get("outputs", []) for c in json.loads(out.read_text())["cells"]])
    assert "adherence all" in text and "image/png" in text
    assert (tmp_path / "run" / "pipeline" / "pipeline.json").is_file()
