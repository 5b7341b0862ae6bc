"""Evaluation of a trained model: sample, score, report (lesson 13).

    python -m tld.evaluate checkpoint=shapes-cond n=72     # a shipped model by name, or any folder: sample, score, report
    python -m tld.evaluate train-classifier     # rebuild tld/assets/shapes-classifier (~1 min)

The scores come from `tld.judge` (the shapes classifier: color, shape, position adherence) and
`tld.fid` (FID on classifier or Inception features); this module samples a checkpoint or a
text-to-image pipeline, scores the samples and writes report.json with labelled pictures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import assets, io
from .config import coerce_value, parse_key_values
from .data import DEFAULT_COLORS, ShapesDataset, parse_caption
from .fid import (
    FID_FEATURES,
    feature_statistics,
    fid,
    frechet_distance,
    image_features,
    inception_available,
)
from .judge import (
    HELD_OUT_SEED,
    PRETRAINED_DIR,
    ShapesClassifier,
    _as_indices,
    classifier_accuracy,
    held_out_captions,
    load_shapes_classifier,
    save_shapes_classifier,
    shapes_accuracy,
    shapes_adherence,
    train_shapes_classifier,
)
from .pipeline import TextToImage
from .runs import load_model
from .samplers import SAMPLERS, generate
from .viz import show

__all__ = [
    # scoring, re-exported from tld.judge and tld.fid (their home since the redesign)
    "ShapesClassifier", "train_shapes_classifier", "classifier_accuracy",
    "save_shapes_classifier", "load_shapes_classifier", "shapes_accuracy", "shapes_adherence",
    "fid", "frechet_distance", "feature_statistics", "image_features", "inception_available",
    "HELD_OUT_SEED", "held_out_captions", "FID_FEATURES", "PRETRAINED_DIR",
    # evaluating a checkpoint
    "evaluate_checkpoint", "eval_config_from_args", "load_for_eval", "generate_for_eval", "format_summary", "main",
]


# --------------------------------------------------------------------------- evaluating a checkpoint

EVAL_KEYS = {  # key: (default, type); None default = required
    "checkpoint": (None, str), "n": (None, int), "steps": (20, int), "guidance": (3.0, float),
    "sampler": ("dpm++2m", str), "seed": (0, int), "out": ("", str), "features": ("classifier", str),
    "batch_size": (64, int), "progress": (True, bool),
}
EVAL_USAGE = ("python -m tld.evaluate checkpoint=PATH n=N [steps=20] [guidance=3] [sampler=dpm++2m] [seed=0] "
              "[out=DIR] [features=classifier] [batch_size=64] [progress=true]\n"
              "       python -m tld.evaluate train-classifier [--out DIR] [--steps N] [--seed S]")


def eval_config_from_args(args: list[str]) -> dict:
    """``key=value`` strings -> the evaluation settings, checked; errors name the key and the valid ones."""
    given = {}
    for k, v in parse_key_values(args, hint=f"; usage: {EVAL_USAGE.splitlines()[0]}"):
        if k not in EVAL_KEYS:
            raise ValueError(f"unknown key {k!r}; valid keys: {', '.join(EVAL_KEYS)}")
        given[k] = v
    cfg = {}
    for k, (default, kind) in EVAL_KEYS.items():
        if k not in given:
            if default is None:
                raise ValueError(f"missing {k}=...; usage: {EVAL_USAGE.splitlines()[0]}")
            cfg[k] = default
            continue
        try:
            cfg[k] = coerce_value(given[k], kind.__name__)
        except ValueError:
            raise ValueError(f"{k} expects {'an' if kind is int else 'a'} {kind.__name__}, got {given[k]!r}") from None
    limits = {"n": 2, "steps": 1, "batch_size": 1}   # FID needs two samples for a covariance
    for k, lo in limits.items():
        if cfg[k] < lo:
            raise ValueError(f"{k} must be at least {lo}, got {cfg[k]}")
    if cfg["guidance"] < 0:
        raise ValueError(f"guidance must be >= 0 (1 = no guidance), got {cfg['guidance']}")
    if cfg["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg['sampler']!r}; valid samplers: {', '.join(SAMPLERS)}")
    if cfg["features"] not in FID_FEATURES:
        raise ValueError(f"unknown features {cfg['features']!r}; valid features: {', '.join(FID_FEATURES)}")
    if not assets.resolve(cfg["checkpoint"]).exists():
        raise FileNotFoundError(f"checkpoint {cfg['checkpoint']!r} does not exist; pass a run or checkpoint folder "
                                "(tld.runs.load_model), a text-to-image pipeline folder (with pipeline.json), or a "
                                f"shipped model's name ({', '.join(assets.SHIPPED)})")
    return cfg


def load_for_eval(path):
    """('text', TextToImage) for a pipeline folder (or a text run holding one), else ('class', model)."""
    path = assets.resolve(path)
    for folder in (path, path / "pipeline"):
        if (folder / "pipeline.json").is_file():
            return "text", TextToImage.from_pretrained(folder)
    model = load_model(path)
    dataset = model.train_config.get("dataset", "shapes")
    if dataset != "shapes" or model.in_chans != 3:
        raise ValueError(f"{str(path)!r} was trained on dataset={dataset!r} with {model.in_chans} channels; the "
                         "shapes classifier (FID features and adherence) judges 3-channel shapes images only")
    return "class", model


class _StepBar:
    """One tqdm bar over every sampler step of every batch (a forward hook ticks it per model call)."""

    def __init__(self, model, total: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="step")
        self.handle = model.register_forward_hook(self._tick)

    def _tick(self, *_):
        self.bar.update(1)   # returns None: a hook's return value would replace the model output

    def close(self):
        self.handle.remove()
        self.bar.n = self.bar.total   # a sampler may call the model once more or less than `steps`
        self.bar.close()


def generate_for_eval(kind: str, gen, n: int, steps: int, guidance: float, sampler: str, seed: int,
                      batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """n samples [n, 3, H, W] in [0, 1] and what each was asked for.

    class: labels cycle over the classes (label = shape * n_colors + color, as ShapesDataset);
    text: the captions of the held-out ShapesDataset(seed=777). Batch k uses seed + k.
    """
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    model = gen if kind == "class" else gen.denoiser
    bar = _StepBar(model, len(batches) * steps, progress, f"sampling {n} images")
    out = []
    try:
        if kind == "class":
            nc = gen.num_classes
            labels = torch.arange(n) % nc if nc else None
            for k, idx in enumerate(batches):
                lab = labels[idx.start:idx.stop] if labels is not None else None
                tc = gen.train_config
                x = generate(gen, tc["schedule"], prediction=tc["prediction"], cond=lab, n=len(idx), steps=steps,
                             sampler=sampler, guidance=guidance if nc else 1.0, seed=seed + k)
                out.append(((x + 1) / 2).cpu())
            asked = {"labels": labels}
        else:
            captions = held_out_captions(n)
            for k, idx in enumerate(batches):
                out.append(gen([captions[i] for i in idx], steps=steps, guidance=guidance, seed=seed + k,
                               sampler=sampler))
            asked = {"captions": captions}
    finally:
        bar.close()
    return torch.cat(out).float().clamp(0, 1), asked


def _attribute_targets(asked: dict, colors=DEFAULT_COLORS) -> dict | None:
    """{'shape', 'color'[, 'position']} index tensors for what the samples were asked to show."""
    if asked.get("captions") is not None:
        parsed = [parse_caption(c) for c in asked["captions"]]
        return {k: [p[k] for p in parsed] for k in ("shape", "color", "position")}
    labels = asked.get("labels")
    if labels is None:
        return None
    return {"shape": labels // len(colors), "color": labels % len(colors)}


def _class_names(targets: dict, clf: ShapesClassifier) -> list:
    shapes = _as_indices(targets["shape"], clf.shapes, "shape")
    colors = _as_indices(targets["color"], clf.colors, "color")
    return [f"{clf.colors[c]} {clf.shapes[s]}" for s, c in zip(shapes.tolist(), colors.tolist())]


def evaluate_checkpoint(checkpoint, n: int, steps: int = 20, guidance: float = 3.0, sampler: str = "dpm++2m",
                        seed: int = 0, out=None, features: str = "classifier", batch_size: int = 64,
                        progress: bool = False) -> dict:
    """Sample n images from a checkpoint, score them, write report.json + pictures into `out`.

    FID compares the samples with n held-out real shapes (ShapesDataset seed 777, rendered at the
    samples' size); `fid_real_floor` is FID between two real sets of the same n, the value a
    perfect model would get at this sample count (FID is biased upwards at small n).
    """
    import matplotlib


    t0 = time.perf_counter()
    if not out:   # beside a run's checkpoints; for a shipped model, in ./eval/<name> (never inside the package)
        out = Path("eval") / str(checkpoint) if str(checkpoint) in assets.SHIPPED and not Path(checkpoint).exists() \
            else Path(checkpoint) / "eval"
    out = Path(out)
    kind, gen = load_for_eval(checkpoint)
    t1 = time.perf_counter()
    images, asked = generate_for_eval(kind, gen, n, steps, guidance, sampler, seed, batch_size, progress)
    sampling_s = time.perf_counter() - t1
    size = images.shape[-1]
    real = (ShapesDataset(size=size, seed=HELD_OUT_SEED, length=n).batch(range(n))["image"] + 1) / 2
    other = (ShapesDataset(size=size, seed=HELD_OUT_SEED + 1, length=n).batch(range(n))["image"] + 1) / 2
    if features == "auto":
        features = "inception" if inception_available() else "classifier"
    clf = load_shapes_classifier()
    f_gen, f_real, f_other = (image_features(x, features, clf) for x in (images, real, other))
    stats_real = feature_statistics(f_real)
    fid_value = frechet_distance(*feature_statistics(f_gen), *stats_real)
    fid_floor = frechet_distance(*feature_statistics(f_other), *stats_real)

    targets = _attribute_targets(asked, clf.colors)
    adherence, per_class, right = None, {}, None
    if targets is not None:
        adherence = shapes_accuracy(images * 2 - 1, targets["shape"], targets["color"], targets.get("position"),
                                    classifier=clf)
        pred = clf.predict(images * 2 - 1)
        right = torch.stack([pred[k] == _as_indices(v, getattr(clf, k + "s"), k) for k, v in targets.items()]).all(0)
        names = _class_names(targets, clf)
        for name in dict.fromkeys(f"{c} {s}" for s in clf.shapes for c in clf.colors):
            sel = [i for i, nm in enumerate(names) if nm == name]
            if sel:
                per_class[name] = right[sel].float().mean().item()
        captions = asked.get("captions") or names
    else:
        captions = [f"sample {i}" for i in range(n)]

    out.mkdir(parents=True, exist_ok=True)
    backend = matplotlib.get_backend()
    matplotlib.use("Agg", force=True)   # files only: no window, also without a display
    try:
        files = _write_pictures(out, images, captions, right, per_class, f_gen, f_real, kind)
    finally:
        matplotlib.use(backend, force=True)
    report = {
        "checkpoint": str(checkpoint), "kind": kind, "n": n, "steps": steps, "guidance": guidance,
        "sampler": sampler, "seed": seed, "image_size": size,
        "seconds": round(time.perf_counter() - t0, 3), "sampling_seconds": round(sampling_s, 3),
        "fid": fid_value, "fid_features": features, "fid_real_floor": fid_floor,
        "fid_real": f"ShapesDataset(size={size}, seed={HELD_OUT_SEED}), first {n} items",
        "adherence": adherence, "per_class": per_class, "files": files,
    }
    if kind == "class":
        report["num_classes"] = gen.num_classes
    io.write_json(out / "report.json", report)
    report["out"] = str(out)
    return report


def _write_pictures(out: Path, images, captions, right, per_class: dict, f_gen, f_real, kind: str) -> list:
    import textwrap

    import matplotlib.pyplot as plt


    files = []
    k = min(len(images), 36)   # a readable grid: the first 36 samples
    fig = show(images[:k], nrow=min(k, 9 if kind == "text" else 6), labels=captions[:k], size=1.3, fontsize=6,
               title="samples (red label: the classifier reads something else)" if right is not None else "samples")
    lines = max(len(textwrap.wrap(str(c), 18)) for c in captions[:k])   # show() wraps labels at 18 characters
    if lines > 1:   # make room for the extra lines above each row
        w, h = fig.get_size_inches()
        fig.set_size_inches(w, h + 0.13 * (lines - 1) * -(-k // min(k, 9 if kind == "text" else 6)))
        fig.tight_layout()
    if right is not None:
        for ax, ok in zip(fig.axes, right[:k].tolist()):
            ax.title.set_color("black" if ok else "red")
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    files.append("samples.png")

    if per_class:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(per_class)), 3))
        names = list(per_class)
        ax.bar(range(len(names)), [per_class[c] for c in names],
               color=[c.split()[0] if c.split()[0] in DEFAULT_COLORS else "grey" for c in names], edgecolor="black")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction read back right")
        ax.set_title("adherence per class (every asked attribute right)")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        plt.close(fig)
        files.append("accuracy.png")

    # Real and generated features projected on the real set's top two principal axes:
    # FID compares these two clouds' means and covariances (in all dimensions, not just two).
    fr, fg = (np.asarray(f, dtype=np.float64) for f in (f_real, f_gen))
    mean = fr.mean(0)
    _, _, vt = np.linalg.svd(fr - mean, full_matrices=False)
    pr, pg = (fr - mean) @ vt[:2].T, (fg - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.scatter(pr[:, 0], pr[:, 1], s=12, alpha=0.6, label="real (held out)")
    ax.scatter(pg[:, 0], pg[:, 1], s=12, alpha=0.6, marker="x", label="generated")
    ax.set_xlabel("PC 1 of real features")
    ax.set_ylabel("PC 2")
    ax.set_title("classifier features: real vs generated", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "features.png", dpi=100)
    plt.close(fig)
    files.append("features.png")
    return files


def format_summary(report: dict) -> str:
    """The one-screen summary printed at the end of `python -m tld.evaluate`."""
    what = (f"class-conditional, {report['num_classes']} classes" if report["kind"] == "class"
            else "text-to-image pipeline")
    lines = [
        f"evaluated {report['checkpoint']} ({what}, {report['image_size']}x{report['image_size']})",
        f"  {report['n']} samples: {report['sampler']} {report['steps']} steps, guidance {report['guidance']:g}, "
        f"seed {report['seed']}; sampling {report['sampling_seconds']:.1f} s, {report['seconds']:.1f} s in all",
        f"  FID ({report['fid_features']} features, vs {report['n']} held-out real)  {report['fid']:10.2f}",
        f"  FID real vs real at the same n (the floor)          {report['fid_real_floor']:10.2f}",
    ]
    adh = report["adherence"]
    if adh is not None:
        parts = [f"{k} {adh[k]:.3f}" for k in ("color", "shape", "position", "all") if adh.get(k) is not None]
        lines.append("  adherence  " + "  ".join(parts))
        worst = sorted((kv for kv in report["per_class"].items() if kv[1] < 1), key=lambda kv: kv[1])[:3]
        lines.append("  weakest classes  " + (", ".join(f"{k} {v:.2f}" for k, v in worst) if worst
                                              else "none: every class read back right"))
    lines.append(f"  wrote report.json, {', '.join(report['files'])} in {report['out']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _train_classifier_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m tld.evaluate train-classifier",
                                     description="train the shapes classifier and save it")
    parser.add_argument("--out", default=str(PRETRAINED_DIR))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    model = train_shapes_classifier(steps=args.steps, seed=args.seed, progress=True)
    print(f"trained in {time.perf_counter() - t0:.1f}s")
    for s in (16, 24, 32):
        acc = classifier_accuracy(model, size=s)
        print(f"held-out accuracy at {s}px: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    print(f"saved to {save_shapes_classifier(model, args.out)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train-classifier":
        return _train_classifier_cli(argv[1:])
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.split("\n")[0] + "\n\nusage: " + EVAL_USAGE)
        return 0 if argv else 2
    try:
        cfg = eval_config_from_args(argv)
        report = evaluate_checkpoint(**cfg)
    except (ValueError, FileNotFoundError) as e:   # speak to the learner, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
