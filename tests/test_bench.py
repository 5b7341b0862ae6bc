"""python -m tld.bench colab: it runs, counts FLOPs right, and its table matches the lessons' colab presets."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tld import bench
from tld.models import count_parameters

REPO = Path(__file__).resolve().parent.parent
LESSONS = tuple(bench.COLAB_LESSONS)


def test_the_colab_bench_prints_a_row_per_training_lesson(capsys):
    bench.main(["colab", "--flop-batch", "2", "--repeats", "0"])
    out = capsys.readouterr().out
    assert set(LESSONS) == {"04_uvit_long_skips", "05_dit_adaln_zero", "06_training_loop", "11_udit_downsampled_tokens",
                            "12_full_training_run"}
    summary = out.split("lesson (all its runs)")[1]
    for lesson in LESSONS:
        (line,) = [ln for ln in summary.splitlines() if ln.startswith(lesson)]
        assert line.split()[-1] in ("s", "min", "h"), line  # ends with the T4 estimate
    assert "no GPU measured" in out and "25%" in out


def test_training_flops_scale_linearly_with_the_batch():
    # what --flop-batch relies on: every counted operator is per example
    torch.manual_seed(0)
    model = bench.lesson05_models(bench.COLAB_LESSONS["05_dit_adaln_zero"]["hand"])["cross-attention (TLD)"]()
    f2, f6 = (bench.step_flops(bench._closure(model, b, 32, 18)) for b in (2, 6))
    assert f6 == 3 * f2 > 0


def test_a_grouped_convolution_backward_costs_two_forwards():
    # torch's formula counts a depthwise conv's weight gradient as a dense one's; ours does not
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    forward = 2 * 2 * 64 * 8 * 8 * 9  # 2 FLOPs per multiply-add, batch 2, 64 channels, 8x8, a 3x3 kernel each
    assert bench.step_flops(lambda: conv(x).sum()) == 3 * forward
    dense = torch.nn.Conv2d(8, 16, 3, padding=1)  # groups=1: torch's own count, unchanged
    y = torch.randn(2, 8, 8, 8, requires_grad=True)
    assert bench.step_flops(lambda: dense(y).sum()) == 3 * 2 * 2 * 16 * 64 * 9 * 8


# --- the table mirrors the lessons ------------------------------------------------------------


def run_cells(name, markers, params, stop=None, fakes=None):
    """Execute a lesson's import, parameters and preset cells, then each cell containing one of ``markers``
    (the last one up to ``stop``), with ``params`` set after the parameters cell; returns the namespace."""
    cells = [c for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) for c in cells]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    chosen = list(range(1, tagged[0] + 2))  # imports, parameters, the preset/device cell (the install cell is 0)
    for m in markers:
        (i,) = [i for i, s in enumerate(sources) if m in s]
        chosen.append(i)
    ns = {}
    for i in chosen:
        src = sources[i]
        if stop and i == chosen[-1]:
            assert stop in src, stop
            src = src.split(stop)[0]
        exec(compile(src, f"{name}[{i}]", "exec"), ns)
        if i == tagged[0]:
            ns.update(params)
        ns.update(fakes or {})
    return ns


IGNORED = {"out_dir", "progress", "seed", "sample_steps", "sample_every", "log_every"}


def same_config(a, b):
    da, db = asdict(a), asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in IGNORED and da[k] != db[k]}


@pytest.fixture
def cuda_present(monkeypatch):
    """The lessons' configuration cells as a GPU runtime sees them (none of them touches CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark = before[1]


def lesson04_configs():
    seen = []

    def fake_train(cfg):  # records what the lesson would train
        seen.append(cfg)
        return {"parameters": 0, "steps": cfg.max_steps, "seconds": 0.0, "final_loss": 0.0}

    ns = run_cells("04_uvit_long_skips", ["budgets = {"], {"preset": "colab"}, fakes={"train": fake_train})
    shutil.rmtree(ns["workdir"], ignore_errors=True)
    return seen


def test_lesson04_colab_matches_the_bench(cuda_present):
    seen = lesson04_configs()
    spec = bench.COLAB_LESSONS["04_uvit_long_skips"]
    assert len(seen) == len(spec["runs"])
    for cfg, run in zip(seen, spec["runs"]):
        assert same_config(cfg, bench.colab_config("04_uvit_long_skips", run)) == {}, run
        assert cfg.mixed_precision == "fp16" and cfg.max_steps == spec["steps"]


def test_lesson04_colab_trains_in_fp32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {cfg.mixed_precision for cfg in lesson04_configs()} == {"no"}


def test_lesson05_colab_matches_the_bench():
    ns = run_cells("05_dit_adaln_zero", ["arms = {"], {"preset": "colab"}, stop="@torch.no_grad()")
    spec = bench.COLAB_LESSONS["05_dit_adaln_zero"]
    assert {k: ns[k] for k in spec["hand"]} == spec["hand"]
    assert spec["hand"]["steps"] == spec["steps"]
    ours = bench.lesson05_models(spec["hand"])
    assert list(ns["arms"]) == list(ours) == list(spec["runs"])
    for name, make in ns["arms"].items():
        assert count_parameters(make()) == count_parameters(ours[name]()), name


def test_lesson06_colab_matches_the_bench(cuda_present):
    ns = run_cells("06_training_loop", ["cfg = T.config_from_args("], {"preset": "colab"})
    shutil.rmtree(ns["workdir"], ignore_errors=True)
    spec = bench.COLAB_LESSONS["06_training_loop"]
    (run,) = spec["runs"]
    assert ns["device"] == "cuda" and torch.are_deterministic_algorithms_enabled()
    assert same_config(ns["cfg"], bench.colab_config("06_training_loop", run)) == {}
    assert ns["cfg"].deterministic and ns["cfg"].mixed_precision == "no"
    assert spec["steps"] == ns["cfg"].max_steps + ns["check_steps"] + 89   # the loop, tld.train's first steps


@pytest.mark.parametrize("cuda", [True, False])
def test_lesson12_colab_matches_the_bench(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    ns = run_cells("12_full_training_run", ["cfg = T.config_from_args("], {"preset": "colab"})
    shutil.rmtree(ns["run_dir"].parent, ignore_errors=True)
    spec = bench.COLAB_LESSONS["12_full_training_run"]
    (run,) = spec["runs"]
    cfg = ns["cfg"]
    if cuda:
        assert same_config(cfg, bench.colab_config("12_full_training_run", run)) == {}
    assert (cfg.mixed_precision, cfg.deterministic) == (("fp16", True) if cuda else ("no", False))
    assert cfg.model == "uvit-course" and cfg.max_minutes == 0 and spec["steps"] == cfg.max_steps + (cfg.keep_checkpoints - 1) * cfg.save_every


def _fast_config(lesson, markers, fakes=None):
    """The cpu-lesson config that lesson 04 / 05's 'your own model that draws' cell trains at preset='colab'."""
    ns = run_cells(lesson, markers, {"preset": "colab"}, stop="fast = train(fast_cfg)", fakes=fakes)
    shutil.rmtree(ns.get("workdir", ""), ignore_errors=True)
    return ns["fast_cfg"]


@pytest.mark.parametrize("lesson", ["04_uvit_long_skips", "05_dit_adaln_zero"])
def test_the_lessons_model_that_draws_is_in_the_colab_table(cuda_present, lesson):
    fake = {"train": lambda cfg: {"parameters": 0, "steps": cfg.max_steps, "seconds": 0.0, "final_loss": 0.0}}
    markers = ["budgets = {", "fast_cfg = TrainConfig("] if lesson.startswith("04") else ["fast_cfg = TrainConfig("]
    cfg = _fast_config(lesson, markers, fake if lesson.startswith("04") else None)
    (run, extra), = bench.COLAB_LESSONS[lesson]["extra"].items()
    assert same_config(cfg, bench.colab_config(lesson, run)) == {}
    steps = 1000 if lesson.startswith("04") else 2000   # 05's DiT trains twice as long (its lesson's table)
    assert cfg.max_steps == extra["steps"] == steps and cfg.mixed_precision == "no" and extra["precision"] == "fp32"
    rows = [r for r in bench.colab_runs() if r["lesson"] == lesson and r["run"] == run]
    assert len(rows) == 1 and rows[0]["size"] == 16 and rows[0]["steps"] == steps
    assert count_parameters(rows[0]["make"]()) == count_parameters(
        __import__("tld").models.create(cfg.model, **bench.model_kwargs(cfg, bench.build_dataset(cfg))))


def test_lesson11_colab_matches_the_bench(cuda_present):
    ns = run_cells("11_udit_downsampled_tokens", ["quick_cfg = TrainConfig("], {"preset": "colab"},
                   stop="quick = train(quick_cfg)")
    spec = bench.COLAB_LESSONS["11_udit_downsampled_tokens"]
    (run,) = spec["runs"]
    assert same_config(ns["quick_cfg"], bench.colab_config("11_udit_downsampled_tokens", run)) == {}
    assert ns["quick_cfg"].max_steps == spec["steps"] == 1000 and ns["quick_cfg"].mixed_precision == "no"
