"""Evaluation of a trained model: sample, score, report (lesson 13).

    python -m tld.evaluate checkpoint=shapes-cond n=72     # a shipped model by name, or any folder: sample, score, report
    python -m tld.evaluate train-classifier     # rebuild tld/assets/shapes-classifier (~1 min)

    # FID-50K as the papers measure it: N samples in ADM's .npz format, made by every process, then
    # FID and KID against ADM's reference batch (or any .npz of images, an image folder, or a prepared
    # folder; ref_n= of its images). A run on a prepared folder decodes its latents with the codec the
    # folder's manifest names (else codec=<a saved codec folder>); captions= prompts a text pipeline.
    accelerate launch --multi_gpu --num_processes 8 -m tld.evaluate checkpoint=runs/dit-xl2-imagenet \
        n=50000 out=samples.npz ref=VIRTUAL_imagenet256_labeled.npz features=inception \
        sampler=ddpm steps=250 guidance=1.5 batch_size=125

The scores come from `tld.judge` (the shapes classifier: color, shape, position adherence), `tld.geometry`
(a second reader of shape that fits each asked kind's ideal outline; ``strict`` asks for render-precise edges,
where the classifier accepts notched or rounded corners) and `tld.fid` (FID and KID on Inception or classifier
features, each figure named by its feature space); this module samples a checkpoint or a text-to-image
pipeline, scores the samples and writes report.json with labelled pictures, or (out=*.npz) the samples file
and <out>.score.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import assets, io
from .autoencoder import load_codec
from .config import coerce_value, parse_key_values
from .data import DEFAULT_COLORS, ShapesDataset, parse_caption
from .fid import (
    FID_FEATURES,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    feature_space,
    feature_statistics,
    fid,
    frechet_distance,
    image_features,
    inception_available,
    kid,
    resolve_features,
)
from .geometry import geometric_reads, strict_iou, summarise_reads
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
from .prepare import iter_prepared_images, manifest_codec, prepared_captions
from .runs import codec_folder, load_model
from .samplers import SAMPLERS, check_interval, generate, sample
from .viz import show

__all__ = [
    # scoring, re-exported from tld.judge and tld.fid (their home since the redesign)
    "ShapesClassifier", "train_shapes_classifier", "classifier_accuracy",
    "save_shapes_classifier", "load_shapes_classifier", "shapes_accuracy", "shapes_adherence",
    "fid", "kid", "frechet_distance", "feature_statistics", "image_features", "inception_available",
    "HELD_OUT_SEED", "held_out_captions", "FID_FEATURES", "PRETRAINED_DIR",
    # evaluating a checkpoint
    "evaluate_checkpoint", "eval_config_from_args", "load_for_eval", "guidance_interval_for", "generate_for_eval",
    "format_summary", "main",
    # the FID-50K protocol
    "sample_to_npz", "score_npz", "evaluate_protocol", "format_protocol", "write_npz", "iter_npz", "npz_keys",
]


# --------------------------------------------------------------------------- evaluating a checkpoint

EVAL_KEYS = {  # key: (default, type); None default = required
    "checkpoint": (None, str), "n": (None, int), "steps": (20, int), "guidance": (3.0, float),
    "sampler": ("dpm++2m", str), "seed": (0, int), "out": ("", str), "features": ("", str),
    "batch_size": (64, int), "progress": (True, bool), "ref": ("", str), "codec": ("", str), "ref_n": (0, int),
    "captions": ("", str), "guidance_interval": ("model", str),
}
EVAL_USAGE = ("python -m tld.evaluate checkpoint=PATH n=N [steps=20] [guidance=3] [guidance_interval=model|none|LO,HI] "
              "[sampler=dpm++2m] [seed=0] [out=DIR] [features=classifier] [batch_size=64] [progress=true]\n"
              "       [accelerate launch -m] python -m tld.evaluate checkpoint=PATH n=50000 out=samples.npz "
              "[ref=REF.npz|FOLDER|PREPARED] [ref_n=0] [features=inception] [codec=FOLDER] [captions=PREPARED|FILE.txt] ...\n"
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
    if cfg["guidance_interval"] != "model":
        check_interval(cfg["guidance_interval"], "guidance_interval")   # a bad value is an error before sampling
    if cfg["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg['sampler']!r}; valid samplers: {', '.join(SAMPLERS)}")
    protocol = cfg["out"].endswith(".npz")
    if cfg["ref_n"] < 0:
        raise ValueError(f"ref_n must be >= 0 (0: every reference image), got {cfg['ref_n']}")
    if cfg["ref"] and not protocol:
        raise ValueError(f"ref={cfg['ref']!r} scores an ADM-format samples file: pass out=<samples>.npz too")
    if not cfg["features"]:   # the published protocol's, or the shapes report's offline default
        cfg["features"] = "inception" if protocol else "classifier"
    if cfg["features"] not in FID_FEATURES or (protocol and cfg["features"] == "auto"):
        valid = [f for f in FID_FEATURES if not (protocol and f == "auto")]
        raise ValueError(f"unknown features {cfg['features']!r}; valid features: {', '.join(valid)}")
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
    # a latent model of shapes (trained with codec=) is judged on its decoded samples
    model.codec_path = codec_folder(path) if model.in_chans != 3 else None
    if dataset != "shapes" or (model.in_chans != 3 and model.codec_path is None):
        raise ValueError(f"{str(path)!r} was trained on dataset={dataset!r} with {model.in_chans} channels; the "
                         "shapes classifier (FID features and adherence) judges 3-channel shapes images only")
    return "class", model


def guidance_interval_for(kind: str, gen, spec="model") -> tuple[float, float] | None:
    """The interval of t in which to guide: ``spec`` when given ("none" or None: every step; "lo,hi"), else ("model") the
    model's own, the one its run sampled with: a class run's ``sample_guidance_interval`` (the course's CPU
    presets guide for t in [0.3, 1]; the papers' recipes at every step), a text pipeline's ``guidance_interval``."""
    if spec != "model":
        return check_interval(spec, "guidance_interval")
    own = gen.config.get("guidance_interval") if kind == "text" else gen.train_config.get("sample_guidance_interval")
    return check_interval(own, "guidance_interval")


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
                      batch_size: int = 64, progress: bool = False,
                      guidance_interval: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict]:
    """n samples [n, 3, H, W] in [0, 1] and what each was asked for, guided only for t in ``guidance_interval``
    (None: at every step).

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
            codec = load_codec(gen.codec_path) if getattr(gen, "codec_path", None) else None
            for k, idx in enumerate(batches):
                lab = labels[idx.start:idx.stop] if labels is not None else None
                tc = gen.train_config
                x = generate(gen, tc["schedule"], prediction=tc["prediction"], cond=lab, n=len(idx), steps=steps,
                             sampler=sampler, guidance=guidance if nc else 1.0, seed=seed + k, clamp=codec is None,
                             guidance_interval=guidance_interval)
                if codec is not None:
                    with torch.no_grad():   # no autograd graph kept across the whole decoded batch
                        x = codec.decode(x).clamp(-1, 1)
                out.append(((x + 1) / 2).cpu())
            asked = {"labels": labels}
        else:
            captions = held_out_captions(n)
            for k, idx in enumerate(batches):
                out.append(gen([captions[i] for i in idx], steps=steps, guidance=guidance, seed=seed + k,
                               sampler=sampler, guidance_interval=guidance_interval))
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
                        progress: bool = False, guidance_interval="model") -> dict:
    """Sample n images from a checkpoint, score them, write report.json + pictures into `out`.

    Guidance applies for t in ``guidance_interval``: by default ("model") the interval the model's run sampled
    with (``guidance_interval_for``), "none" or None at every step, or (lo, hi) / "lo,hi".

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
    interval = guidance_interval_for(kind, gen, guidance_interval)
    t1 = time.perf_counter()
    images, asked = generate_for_eval(kind, gen, n, steps, guidance, sampler, seed, batch_size, progress, interval)
    sampling_s = time.perf_counter() - t1
    size = images.shape[-1]
    real = (ShapesDataset(size=size, seed=HELD_OUT_SEED, length=n).batch(range(n))["image"] + 1) / 2
    other = (ShapesDataset(size=size, seed=HELD_OUT_SEED + 1, length=n).batch(range(n))["image"] + 1) / 2
    features = resolve_features(features)
    clf = load_shapes_classifier()
    f_gen, f_real, f_other = (image_features(x, features, clf) for x in (images, real, other))
    stats_real = feature_statistics(f_real)
    fid_value = frechet_distance(*feature_statistics(f_gen), *stats_real)
    fid_floor = frechet_distance(*feature_statistics(f_other), *stats_real)
    kid_value, kid_stderr = kid(f_gen, f_real)   # unbiased at this n, unlike FID

    targets = _attribute_targets(asked, clf.colors)
    adherence, per_class, right, geometry, outline_ok = None, {}, None, None, None
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
        # the second reader, sharing nothing with the classifier: fit each asked kind's ideal outline (tld.geometry)
        reads = geometric_reads(images * 2 - 1, _as_indices(targets["shape"], clf.shapes, "shape").tolist(),
                                names=tuple(clf.shapes))
        outline_ok = reads["passed"]
        geometry = {**summarise_reads(reads), "strict_iou": strict_iou(size)}
    else:
        captions = [f"sample {i}" for i in range(n)]

    out.mkdir(parents=True, exist_ok=True)
    backend = matplotlib.get_backend()
    matplotlib.use("Agg", force=True)   # files only: no window, also without a display
    try:
        files = _write_pictures(out, images, captions, right, per_class, f_gen, f_real, kind, outline_ok)
    finally:
        matplotlib.use(backend, force=True)
    report = {
        "checkpoint": str(checkpoint), "kind": kind, "n": n, "steps": steps, "guidance": guidance,
        "guidance_interval": list(interval) if interval is not None else None,
        "sampler": sampler, "seed": seed, "image_size": size,
        "seconds": round(time.perf_counter() - t0, 3), "sampling_seconds": round(sampling_s, 3),
        "fid": fid_value, "fid_features": feature_space(features, clf), "fid_real_floor": fid_floor,
        "kid": kid_value, "kid_stderr": kid_stderr,
        "fid_real": f"ShapesDataset(size={size}, seed={HELD_OUT_SEED}), first {n} items",
        "adherence": adherence, "geometry": geometry, "per_class": per_class, "files": files,
    }
    if kind == "class":
        report["num_classes"] = gen.num_classes
    io.write_json(out / "report.json", report)
    report["out"] = str(out)
    return report


def _write_pictures(out: Path, images, captions, right, per_class: dict, f_gen, f_real, kind: str,
                    outline_ok=None) -> list:
    import textwrap

    import matplotlib.pyplot as plt


    files = []
    k = min(len(images), 36)   # a readable grid: the first 36 samples
    fig = show(images[:k], nrow=min(k, 9 if kind == "text" else 6), labels=captions[:k], size=1.3, fontsize=6,
               title=("samples. Red label: the classifier reads something else.\nOrange: read right, but "
                      "not at render precision (tld.geometry's strict)")
               if right is not None else "samples")
    lines = max(len(textwrap.wrap(str(c), 18)) for c in captions[:k])   # show() wraps labels at 18 characters
    if lines > 1:   # make room for the extra lines above each row
        w, h = fig.get_size_inches()
        fig.set_size_inches(w, h + 0.13 * (lines - 1) * -(-k // min(k, 9 if kind == "text" else 6)))
        fig.tight_layout()
    if right is not None:
        crisp = outline_ok[:k].tolist() if outline_ok is not None else [True] * k
        for ax, ok, sharp in zip(fig.axes, right[:k].tolist(), crisp):
            ax.title.set_color("red" if not ok else "black" if sharp else "darkorange")
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


def _where(interval) -> str:
    return "at every step" if not interval else f"for t in [{interval[0]:g}, {interval[1]:g}]"


def format_summary(report: dict) -> str:
    """The one-screen summary printed at the end of `python -m tld.evaluate`."""
    what = (f"class-conditional, {report['num_classes']} classes" if report["kind"] == "class"
            else "text-to-image pipeline")
    lines = [
        f"evaluated {report['checkpoint']} ({what}, {report['image_size']}x{report['image_size']})",
        f"  {report['n']} samples: {report['sampler']} {report['steps']} steps, guidance {report['guidance']:g} "
        f"{_where(report.get('guidance_interval'))}, seed {report['seed']}; "
        f"sampling {report['sampling_seconds']:.1f} s, {report['seconds']:.1f} s in all",
        f"  FID ({report['fid_features']} features, vs {report['n']} held-out real)  {report['fid']:10.2f}",
        f"  FID real vs real at the same n (the floor)          {report['fid_real_floor']:10.2f}",
    ]
    if report.get("kid") is not None:
        lines.append(f"  KID ({report['fid_features']} features; 0 = same distribution)  "
                     f"{report['kid']:.4f} ± {report['kid_stderr']:.4f}")
    adh = report["adherence"]
    if adh is not None:
        parts = [f"{k} {adh[k]:.3f}" for k in ("color", "shape", "position", "all") if adh.get(k) is not None]
        lines.append("  adherence (shapes classifier)  " + "  ".join(parts))
    geo = report.get("geometry")
    if geo is not None:
        lines.append(f"  geometry (ideal outlines)     shape {geo['shape']:.3f}  strict {geo['strict']:.3f}  "
                     f"IoU {geo['iou']:.3f}  (strict: the asked kind at IoU >= {geo['strict_iou']:.3f})")
    if adh is not None:
        worst = sorted((kv for kv in report["per_class"].items() if kv[1] < 1), key=lambda kv: kv[1])[:3]
        lines.append("  weakest classes  " + (", ".join(f"{k} {v:.2f}" for k, v in worst) if worst
                                              else "none: every class read back right"))
    lines.append(f"  wrote report.json, {', '.join(report['files'])} in {report['out']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- FID-50K: ADM's .npz protocol

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image_seed(seed: int, i: int) -> int:
    """The seed of image i's starting noise: a function of (seed, i) only, whatever the batch or process."""
    return (seed * 1_000_003 + i) * 2 + 1


def _batch_seed(seed: int, k: int) -> int:
    """The seed of global batch k's sampler noise (ddpm, ddim with eta > 0)."""
    return (seed * 1_000_003 + k) * 2


def _load_generator(checkpoint, codec: str, device):
    """(kind, model, decode, sample-condition function) for the protocol: any class / unconditional run
    (pixels, or latents decoded by ``codec``) or a text-to-image pipeline (its own codec)."""
    path = assets.resolve(checkpoint)
    for folder in (path, path / "pipeline"):
        if (folder / "pipeline.json").is_file():
            pipe = TextToImage.from_pretrained(folder, device)
            return "text", pipe, pipe.codec.decode, pipe.config
    model = load_model(path, device=device)
    tc = model.train_config
    dec = load_codec(codec, device).decode if codec else (lambda x: x)
    own = codec_folder(path) if not codec and model.in_chans != 3 else None
    if own is not None:   # trained with codec=: an exported model's codec/, or the run's codec folder
        dec = load_codec(own, device).decode
    elif not codec and model.in_chans != 3 and tc.get("dataset") == "prepared":
        # trained on a prepared folder: its manifest names the codec that made the latents
        made = Path(tc["data_root"]) / "manifest.json"
        if not made.is_file():
            raise FileNotFoundError(f"{str(path)!r} makes {model.in_chans}-channel latents of the prepared folder "
                                    f"{tc['data_root']!r}, which is not here to name their codec; pass codec=<its "
                                    f"codec folder>")
        dec = manifest_codec(io.read_json(made), device).decode
    elif not codec and model.in_chans != 3:
        raise ValueError(f"{str(path)!r} makes {model.in_chans}-channel latents; pass codec=<the codec folder that "
                         "made them> (a saved DiffusersVAE, e.g. the SD VAE) so its samples can be decoded to images")
    return "class" if model.num_classes else "none", model, dec, \
        {"schedule": tc["schedule"], "prediction": tc["prediction"]}


def _to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as ADM's sampler writes them."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_npz(path, arrays: dict) -> Path:
    """Write an uncompressed .npz from {name: (shape, dtype, iterable of chunks along axis 0)}, streaming.

    ``np.load(path)[name]`` reads it back; nothing holds the whole array in memory (50K 256 px images are
    9.8 GB). Atomic: written to a temporary sibling, then renamed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in arrays.items():
                dtype = np.dtype(dtype)
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
                    rows = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        f.write(chunk.tobytes())
                        rows += len(chunk)
                    if rows != shape[0]:
                        raise ValueError(f"{name}: wrote {rows} rows, the header says {shape[0]}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def iter_npz(path, key: str = "arr_0", batch: int = 500):
    """Batches along axis 0 of one array of an .npz, read from the file without loading it whole."""
    with zipfile.ZipFile(path) as zf:
        if key + ".npy" not in zf.namelist():
            raise KeyError(f"{path} has no {key!r}; it holds {', '.join(n[:-4] for n in zf.namelist())}")
        with zf.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(f"{path}:{key} is Fortran-ordered; expected C order")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch):
                m = min(batch, shape[0] - start)
                yield np.frombuffer(f.read(m * row), dtype=dtype).reshape(m, *shape[1:])


def npz_keys(path) -> dict:
    """{name: shape} of the arrays in an .npz, from their headers only."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                out[name[:-4] if name.endswith(".npy") else name] = read_header(f)[0]
    return out


def sample_to_npz(checkpoint, n: int, out, *, steps: int = 20, guidance: float = 3.0, sampler: str = "dpm++2m",
                  seed: int = 0, batch_size: int = 64, codec: str = "", progress: bool = False,
                  captions: str = "", guidance_interval="model") -> Path:
    """Sample n images into ADM's .npz format (``arr_0`` uint8 [n, H, W, 3]; ``arr_1`` int64 labels for a
    class model), across every process of ``accelerate launch``.

    Global batch k holds images [k B, (k + 1) B) and process r samples the batches k = r, r + P, ...:
    image i starts from noise seeded by (seed, i), with label i mod num_classes (every class equally
    often), and batch k's sampler noise is seeded by (seed, k). So 1 and N processes write the same
    file (for one batch_size). A text pipeline's image i shows caption i mod C of ``captions`` (a captioned
    prepared folder, e.g. the validation set that is also ``ref``, or a text file of one caption a line;
    default: the held-out shapes captions). Each batch is saved to ``<out>.parts/`` as it is made, so a killed run
    resumes at the batches not yet written; the main process then streams them into ``out``.
    Guidance applies for t in ``guidance_interval`` (``guidance_interval_for``: by default the model's own, which
    for the papers' recipes is every step).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())   # gloo on a CPU machine, as the trainer
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    settings = {"checkpoint": str(checkpoint), "n": n, "steps": steps, "guidance": guidance, "sampler": sampler,
                "seed": seed, "batch_size": batch_size, "codec": codec}
    if guidance_interval != "model":
        settings["guidance_interval"] = guidance_interval
    if captions:
        settings["captions"] = captions
    done = out.with_name(out.name + ".json")
    if out.is_file() and done.is_file() and io.read_json(done).get("settings") == settings:
        return out   # made already, with these settings
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        old = parts / "settings.json"
        if old.is_file() and io.read_json(old) != settings:
            raise ValueError(f"{parts} holds batches made with other settings ({io.read_json(old)}); remove it or "
                             f"pass the same settings ({settings})")
        io.write_json(old, settings)
    state.wait_for_everyone()
    device = state.device if state.device.type == "cuda" else torch.device("cpu")   # not "cpu:0": safetensors
    kind, gen, decode, cfg = _load_generator(checkpoint, codec, device)
    model = gen.denoiser if kind == "text" else gen
    interval = guidance_interval_for(kind, gen, guidance_interval)
    prompts = _protocol_captions(captions, n) if kind == "text" else None
    if captions and kind != "text":
        raise ValueError(f"captions={captions!r} is for a text-to-image pipeline; {str(checkpoint)!r} is a {kind} model")
    batches = list(range(-(-n // batch_size)))
    mine = batches[state.process_index::state.num_processes]
    todo = [k for k in mine if not (parts / f"images_{k:06d}.npy").is_file()]
    from tqdm.auto import tqdm

    for k in tqdm(todo, disable=not (progress and state.is_main_process), desc=f"sampling {n} images", unit="batch"):
        idx = range(k * batch_size, min(n, (k + 1) * batch_size))
        noise = torch.stack([torch.randn(model.in_chans, model.img_size, model.img_size,
                                         generator=torch.Generator().manual_seed(_image_seed(seed, i))) for i in idx])
        labels, cond, null = None, None, None
        if kind == "text":
            cond, null = gen.condition([prompts[i] for i in idx])
        elif kind == "class":
            labels = torch.tensor([i % model.num_classes for i in idx])
            cond = labels.to(device)
            null = model.null_condition(cond) if guidance != 1.0 else None
        with torch.no_grad():
            z = sample(model, noise.to(device), cfg["schedule"], sampler=sampler, steps=steps,
                       prediction=cfg["prediction"], cond=cond, null_cond=null,
                       guidance=guidance if cond is not None else 1.0, guidance_interval=interval,
                       generator=torch.Generator().manual_seed(_batch_seed(seed, k)), progress=False)
            images = decode(z)
        if labels is not None:
            _save_npy_atomic(parts / f"labels_{k:06d}.npy", labels.numpy().astype(np.int64))
        _save_npy_atomic(parts / f"images_{k:06d}.npy", _to_uint8_nhwc(images))   # last: marks the batch done
    state.wait_for_everyone()
    if state.is_main_process:
        first = np.load(parts / "images_000000.npy", mmap_mode="r")
        arrays = {"arr_0": ((n, *first.shape[1:]), np.uint8,
                            (np.load(parts / f"images_{k:06d}.npy") for k in batches))}
        if kind == "class":
            arrays["arr_1"] = ((n,), np.int64, (np.load(parts / f"labels_{k:06d}.npy") for k in batches))
        write_npz(out, arrays)
        io.write_json(done, {"settings": settings, "kind": kind, "shape": [n, *first.shape[1:]],
                             "processes": state.num_processes})
        shutil.rmtree(parts)
    state.wait_for_everyone()
    return out


def _protocol_captions(spec: str, n: int) -> list[str]:
    """n prompts: caption i mod C of a captioned prepared folder or a text file (one a line); the held-out
    shapes captions without a spec."""
    if not spec:
        return held_out_captions(n)
    p = Path(spec)
    if (p / "manifest.json").is_file():
        caps = prepared_captions(p)
    elif p.is_file():
        caps = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"captions={spec!r} is neither a prepared folder (manifest.json) nor a text file "
                                f"of one caption a line")
    if not caps:
        raise ValueError(f"captions={spec!r} holds no captions")
    return [caps[i % len(caps)] for i in range(n)]


def _center_crop_resize(image, size: int) -> np.ndarray:
    """ADM's center crop: halve with a box filter while the short side is >= 2 size, resize the short side
    to size (bicubic), crop the center square. -> uint8 [size, size, 3]."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _reference(ref, size: int, batch: int, ref_n: int = 0, device="cpu"):
    """(image batches uint8 NHWC or None, (mu, sigma) or None, description) of a reference.

    A prepared folder (tld.prepare) gives its images: pixels as stored, latents decoded by the codec its
    manifest records; one view per item; ``ref_n`` > 0 takes that many items spread over the folder."""
    ref = Path(ref)
    if ref.suffix == ".npz" and ref.is_file():
        keys = npz_keys(ref)
        stats = None
        if "mu" in keys and "sigma" in keys:
            with np.load(ref) as z:
                stats = (z["mu"], z["sigma"])
        images = (lambda: iter_npz(ref, "arr_0", batch)) if "arr_0" in keys else None
        if images is None and stats is None:
            raise ValueError(f"reference {ref} has neither images 'arr_0' nor statistics 'mu'/'sigma' "
                             f"(it holds {', '.join(keys)})")
        n = keys["arr_0"][0] if "arr_0" in keys else 0
        return images, stats, f"{ref.name} ({n} images{', mu/sigma' if stats else ''})"
    if ref.is_dir():
        if (ref / "manifest.json").is_file():   # a prepared folder: its images, decoded if they are latents
            have = io.read_json(ref / "manifest.json").get("image_size")
            if have != size:
                raise ValueError(f"reference {ref} is a prepared folder of {have} px images, the samples are {size} "
                                 f"px; FID compares images of one size (prepare the reference with size={size})")
            images, count, what = iter_prepared_images(ref, batch, ref_n, device)
            return images, None, f"{ref} (a prepared folder: {count} images, {what})"
        files = sorted(p for p in ref.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"reference folder {ref} holds no images ({', '.join(IMAGE_SUFFIXES)})")

        def images():
            from PIL import Image

            for i in range(0, len(files), batch):
                out = []
                for p in files[i:i + batch]:
                    with Image.open(p) as im:
                        out.append(_center_crop_resize(im, size))
                yield np.stack(out)
        return images, None, f"{ref} ({len(files)} images, center-cropped to {size} px)"
    raise FileNotFoundError(f"reference {str(ref)!r} does not exist; pass ADM's reference batch (.npz with arr_0 "
                            "and/or mu, sigma), an .npz of images, a folder of images, or a prepared folder (python -m tld.prepare)")


def _features_of_batches(batches, features: str, classifier, batch_size: int, device) -> torch.Tensor:
    out = []
    for b in batches:
        x = torch.from_numpy(np.array(b)).permute(0, 3, 1, 2).float() / 255   # a copy: frombuffer is read-only
        out.append(image_features(x, features, classifier, batch_size, device))
    return torch.cat(out)


def score_npz(samples, ref, features: str = "inception", classifier=None, batch_size: int = 250, device="cpu",
              kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, ref_n: int = 0) -> dict:
    """FID and KID of an ADM-format samples .npz against a reference, in the named feature space.

    FID uses the reference's own mu / sigma when it has them and the features are Inception's (ADM's
    reference batches were summarised by the same network), else statistics of its images' features.
    KID needs the reference's images; without them it is None.
    """
    if features not in ("inception", "classifier"):
        raise ValueError(f"features must be 'inception' or 'classifier', got {features!r}")
    clf = classifier if classifier is not None or features != "classifier" else load_shapes_classifier(device=device)
    shape = npz_keys(samples).get("arr_0")
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{samples} is not an ADM samples file: expected 'arr_0' uint8 [N, H, W, 3], got {shape}")
    images, stats, described = _reference(ref, shape[1], batch_size, ref_n, device)
    f_gen = _features_of_batches(iter_npz(samples, "arr_0", batch_size), features, clf, batch_size, device)
    f_ref = _features_of_batches(images(), features, clf, batch_size, device) if images else None
    use_file_stats = stats is not None and (features == "inception" or f_ref is None)
    if use_file_stats and features != "inception":
        raise ValueError(f"reference {ref} has only mu/sigma (Inception statistics, as ADM's are); "
                         f"features={features!r} needs its images (arr_0)")
    ref_stats = stats if use_file_stats else feature_statistics(f_ref)
    value = frechet_distance(*feature_statistics(f_gen), *ref_stats)
    kid_value, kid_err = kid(f_gen, f_ref, kid_subsets, kid_subset_size) if f_ref is not None else (None, None)
    return {"fid": value, "kid": kid_value, "kid_stderr": kid_err, "features": feature_space(features, clf),
            "n_samples": int(shape[0]), "n_reference": int(len(f_ref)) if f_ref is not None else None,
            "reference": described, "reference_stats": "the file's mu/sigma" if use_file_stats else "computed",
            "kid_subsets": kid_subsets, "kid_subset_size": min(kid_subset_size, int(shape[0]),
                                                                len(f_ref) if f_ref is not None else 0)}


def evaluate_protocol(checkpoint, n: int, out, ref: str = "", features: str = "inception", steps: int = 20,
                      guidance: float = 3.0, sampler: str = "dpm++2m", seed: int = 0, batch_size: int = 64,
                      codec: str = "", progress: bool = False, ref_n: int = 0, captions: str = "",
                      guidance_interval="model") -> dict | None:
    """``python -m tld.evaluate checkpoint=... n=50000 out=samples.npz ref=...``: sample (every process), then
    score on the main process; writes ``<out>.score.json``. Returns the scores (None on other processes)."""
    from accelerate import PartialState

    out = sample_to_npz(checkpoint, n, out, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                        batch_size=batch_size, codec=codec, progress=progress, captions=captions,
                        guidance_interval=guidance_interval)
    state = PartialState(cpu=not torch.cuda.is_available())   # gloo on a CPU machine, as the trainer
    if not state.is_main_process:
        return None
    report = {"samples": str(out), "n": n, "checkpoint": str(checkpoint), "steps": steps, "guidance": guidance,
              "sampler": sampler, "seed": seed}
    if ref:
        report.update(score_npz(out, ref, features, device=state.device if state.device.type == "cuda" else "cpu",
                                ref_n=ref_n))
        io.write_json(out.with_name(out.name + ".score.json"), report)
    return report


def format_protocol(report: dict) -> str:
    lines = [f"wrote {report['n']} samples of {report['checkpoint']} to {report['samples']} "
             f"({report['sampler']} {report['steps']} steps, guidance {report['guidance']:g}, seed {report['seed']})"]
    if "fid" in report:
        lines.append(f"  against {report['reference']}, {report['features']} features:")
        lines.append(f"  FID-{report['n']} ({report['features']})  {report['fid']:.3f}"
                     f"  (reference statistics: {report['reference_stats']})")
        if report["kid"] is not None:
            lines.append(f"  KID ({report['features']})  {report['kid']:.5f} ± {report['kid_stderr']:.5f}"
                         f"  ({report['kid_subsets']} subsets of {report['kid_subset_size']})")
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
        if cfg["out"].endswith(".npz"):   # the FID-50K protocol: ADM's samples file, scored against ref
            report = evaluate_protocol(**cfg)
            if report is not None:
                print(format_protocol(report))
            return 0
        ref, codec, ref_n, captions = cfg.pop("ref"), cfg.pop("codec"), cfg.pop("ref_n"), cfg.pop("captions")
        if ref or codec or ref_n or captions:
            raise ValueError("ref=, ref_n=, codec= and captions= go with out=<samples>.npz (the FID-50K protocol)")
        report = evaluate_checkpoint(**cfg)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:   # speak to the learner, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
