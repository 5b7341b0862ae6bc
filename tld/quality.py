"""Which CPU recipe learns the shapes soonest: train each arm, read its samples two ways (``bench quality``).

    python -m tld.bench quality                          # every arm, 600 steps each
    python -m tld.bench quality steps=300 arms=x0,v      # a shorter sweep of some arms
    python -m tld.bench quality base=cpu-lesson arms=x0,v,x0+all-positions steps=1000   # lesson 12's model
    python -m tld.bench quality arms=x0,x0+latent-tld       # pixels against latent diffusion (make demo)

Every arm is ``preset=cpu-demo`` (or the preset ``base=`` names) with the plain loss (``loss_weighting=none``) and
a few keys changed (``ARMS``), so ``x0`` is the unweighted x0 loss whatever the base; trained from the same seed for the
same number of steps, checkpointed ``evals`` times along the way. Each checkpoint's EMA weights draw
``per_class`` samples of every class (DDIM, guidance 3, the demo's sampling) that two readers score:

- the shapes classifier (`tld.judge`): color, shape and both;
- the geometric reader (`tld.geometry`): the shape read by fitting the ideal outlines, and ``strict``, the
  fraction read right *and* fitting at render precision (IoU >= ``strict_iou``);
- ``floor``: the IoU of the denoiser's one-step x0 estimate from perfect renders noised to t = 0.1
  (``one_step_reads``), a bound on how crisp its samples can get that no sampler setting lifts.

The table gives the training minutes each checkpoint took on this machine. On a shared machine the
minutes move with the load while the steps do not, so compare arms at equal steps, and their speed by
``steps/s``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from . import assets
from . import train as T
from .autoencoder import load_codec
from .config import config_from_args, parse_key_values
from .data import DEFAULT_COLORS, POSITIONS, SHAPES, ShapesDataset
from .diffusion import add_noise, convert, get_schedule
from .geometry import geometric_accuracy
from .judge import shapes_accuracy
from .runs import checkpoint_folder, codec_folder, load_model
from .samplers import GUIDANCE_INTERVAL, check_interval
from .training_data import shapes_positions_kwargs

__all__ = ["ARMS", "read_samples", "print_reads", "shipped_class_samples", "score_model", "one_step_reads", "run_arm", "sweep", "format_table", "main"]

# name: the keys each arm changes in preset=cpu-demo (x0 prediction, uniform t, lr 2e-3, batch 64, U-ViT
# uvit-course: width 128, depth 6, patch 4, depthwise-conv MLP), after loss_weighting=none (run_arm)
ARMS: dict[str, list[str]] = {
    "x0": [],
    "v": ["prediction=v"],
    "eps": ["prediction=eps"],
    "v+x0-weighting": ["prediction=v", "loss_weighting=x0"],
    "x0+min-snr5": ["loss_weighting=min-snr", "min_snr_gamma=5"],
    "x0+edm-weighting": ["loss_weighting=edm", "edm_sigma_data=0.5"],
    "edm-precond": ["prediction=edm"],
    "x0+logit-normal-t": ["time_sampler=logit-normal"],
    "x0+lr4e-3": ["lr=4e-3"],
    "x0+batch32": ["batch_size=32"],
    "x0-conv-mlp": ["model.conv_mlp=False"],
    "x0+centered": ["shapes_positions=center"],
    "x0+all-positions": ["shapes_positions=" + ",".join(POSITIONS)],
    "x0+wide192-depth4": ["model.embed_dim=192", "model.depth=4", "model.num_heads=6"],
    # latent diffusion (make demo's recipe since 2026-12-04): the TLD denoiser on shapes-t2i's VAE latents
    "x0+latent-tld": ["codec=shapes-t2i/codec", "model=tld-course", "model.patch_size=2", "cache_items=10000"],
}


FLOOR_T = 0.1   # the noise level of the table's ``floor`` column


def read_samples(images, labels, colors=DEFAULT_COLORS) -> dict:
    """Class samples [B, 3, H, W] in [-1, 1] with their labels (shape * n_colors + color), read two ways.

    Returns the shapes classifier's 'color', 'shape' and 'both' (`tld.judge.shapes_accuracy`) and the
    geometric reader's 'geo_shape', 'strict' and 'iou' (`tld.geometry.geometric_accuracy`).
    """
    labels = torch.as_tensor(labels)
    shapes, cols = labels // len(colors), labels % len(colors)
    clf = shapes_accuracy(images, shapes, cols)
    geo = geometric_accuracy(images, [SHAPES[int(s)] for s in shapes])
    return {"color": clf["color"], "shape": clf["shape"], "both": clf["all"], "geo_shape": geo["shape"],
            "strict": geo["strict"], "iou": geo["iou"]}


def print_reads(reads: dict) -> None:
    """One line per set of samples: both readers' figures (``read_samples``'s keys)."""
    width = max(len(k) for k in reads) + 2
    print(f"{'samples':<{width}}{'color':>7}{'shape':>7}{'geometry: shape':>17}{'strict':>8}{'IoU':>6}")
    for k, r in reads.items():
        print(f"{k:<{width}}{r['color']:>7.2f}{r['shape']:>7.2f}{r['geo_shape']:>17.2f}{r['strict']:>8.2f}{r['iou']:>6.2f}")


@torch.no_grad()
def shipped_class_samples(labels, steps: int = 20, guidance: float = 3.0, seed: int = 0, device="cpu",
                          guidance_interval: tuple[float, float] | None = GUIDANCE_INTERVAL) -> torch.Tensor:
    """Samples [B, 3, 32, 32] in [-1, 1] of the given classes from the shipped ``shapes-cond-uvit`` U-ViT, guided for t in
    ``guidance_interval`` (None: at every step)."""
    model = load_model(assets.path("shapes-cond-uvit"), device=device)
    labels = torch.as_tensor(labels).to(device)
    return T.generate(model, model.train_config, labels, steps=steps, guidance=guidance, seed=seed,
                      guidance_interval=guidance_interval).cpu()


@torch.no_grad()
def score_model(model, per_class: int = 4, steps: int = 30, guidance: float = 3.0, seed: int = 0,
                guidance_interval: tuple[float, float] | None = None, codec=None, sampler: str = "ddim") -> dict:
    """Sample ``per_class`` images of every class and read them with both readers (a latent model's samples
    decoded by ``codec`` first: ``tld.autoencoder.load_codec(tld.runs.codec_folder(path))``)."""
    labels = T.sample_grid_labels(model.num_classes, per_class)
    images = T.generate(model, model.train_config, labels, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                        guidance_interval=guidance_interval, clamp=codec is None)
    if codec is not None:
        images = codec.decode(images).clamp(-1, 1)
    return {**read_samples(images, labels), "images": images, "labels": labels}


@torch.no_grad()
def one_step_reads(model, t: float = 0.1, n: int = 108, seed: int = 0, codec=None) -> dict:
    """The geometric reading of a class model's one-step estimate of x0 from *perfect* renders noised to ``t``.

    A sampler's last steps can draw no sharper than the denoiser's x0 estimate at low noise, so this is a
    floor under the crispness of its samples that no sampler setting lifts: renders of the model's own
    dataset (its size and positions, held-out seed 7 + seed), noised to t with the model's schedule, read
    by ``tld.geometry`` against their true shapes. A perfect denoiser scores IoU ~0.99 and strict 1.
    A latent model (``codec``) noises the renders' latents and its estimate is decoded before it is read, so
    the codec's own loss is part of the figure (``tld.autoencoder.reconstruction_reads`` measures that alone).
    """
    cfg = model.train_config
    kw = shapes_positions_kwargs(cfg.get("shapes_positions") or "")
    size = int(cfg.get("image_size") or model.img_size) if codec is not None else model.img_size
    batch = ShapesDataset(size=size, seed=7 + seed, length=n, **kw).batch(range(n))
    device = next(model.parameters()).device
    x0, labels = batch["image"].to(device), batch["label"].to(device)
    if codec is not None:
        x0 = codec.encode(x0)
    schedule = get_schedule(cfg["schedule"])
    tt = torch.full((n,), float(t), device=device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x_t = add_noise(x0, eps, tt, schedule)
    x0_hat = convert(model(x_t, tt, labels), x_t, tt, schedule, cfg["prediction"], "x0")
    x0_hat = codec.decode(x0_hat) if codec is not None else x0_hat
    return geometric_accuracy(x0_hat.clamp(-1, 1).cpu(), batch["shape"])


def run_arm(name: str, keys: list[str], steps: int, evals: int, root: Path, threads: int = 0,
            per_class: int = 4, base: str = "cpu-demo", interval: tuple[float, float] | None = None) -> list[dict]:
    """Train one arm (preset ``base`` with ``keys``) for ``steps`` steps; score it at ``evals`` checkpoints, its
    samples guided for t in ``interval`` (None: at every step, as the rows of earlier sweeps)."""
    every = max(1, steps // evals)
    args = [f"preset={base}", "loss_weighting=none", *keys, f"max_steps={steps}", "max_minutes=0", f"save_every={every}",
            f"keep_checkpoints={evals + 1}", f"log_every={every}", "progress=false",
            f"out_dir={root / name}", f"threads={threads}"]
    cfg = config_from_args(args)
    summary = T.train(cfg)
    seconds = {r["step"]: r["seconds"] for r in map(json.loads, (root / name / "log.jsonl").read_text().splitlines())}
    found = codec_folder(root / name)   # a latent arm's samples are decoded before they are read
    codec = load_codec(found) if found is not None else None
    rows = []
    for step in sorted({min(k * every, steps) for k in range(1, evals + 1)} | {steps}):
        folder = checkpoint_folder(root / name, step)
        if not folder.exists():
            continue
        model = load_model(folder)
        s = score_model(model, per_class=per_class, guidance_interval=interval, codec=codec)
        rows.append({"arm": name, "step": step, "minutes": seconds.get(step, summary["seconds"]) / 60,
                     "steps_per_s": summary["steps_per_second"], **{k: v for k, v in s.items()
                                                                     if k not in ("images", "labels")},
                     "floor": one_step_reads(model, FLOOR_T, codec=codec)["iou"]})
    return rows


def sweep(arms=None, steps: int = 600, evals: int = 3, threads: int = 0, root=None, per_class: int = 4,
          base: str = "cpu-demo", interval: tuple[float, float] | None = None) -> list[dict]:
    """Every arm of ``arms`` (names of ``ARMS``; all by default), trained from preset ``base`` and scored."""
    names = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; expected some of {list(ARMS)}")
    with tempfile.TemporaryDirectory() if root is None else contextlib.nullcontext(root) as folder:
        rows = []
        for name in names:
            t0 = time.perf_counter()
            arm = run_arm(name, ARMS[name], steps, evals, Path(folder), threads, per_class, base, interval)
            rows += arm
            # each arm's rows as soon as it is done: a long sweep stopped part-way still has them
            print(f"{format_table(arm)}\n  ({name}: {(time.perf_counter() - t0) / 60:.1f} min with sampling)", flush=True)
        return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'arm':<20}{'step':>6}{'min':>7}{'steps/s':>9}   {'classifier: color':>17}{'shape':>7}{'both':>7}"
            f"   {'geometry: shape':>15}{'strict':>8}{'IoU':>7}{'floor':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['arm']:<20}{r['step']:>6}{r['minutes']:>7.1f}{r['steps_per_s']:>9.2f}   "
                     f"{r['color']:>17.3f}{r['shape']:>7.3f}{r['both']:>7.3f}   "
                     f"{r['geo_shape']:>15.3f}{r['strict']:>8.3f}{r['iou']:>7.3f}"
                     + (f"{r['floor']:>7.3f}" if "floor" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> dict:
    opts = dict(parse_key_values(argv or [], hint=" (e.g. steps=300 arms=x0,v evals=3 threads=2)"))
    known = {"steps", "arms", "evals", "threads", "per_class", "out", "base", "interval"}
    if set(opts) - known:
        raise ValueError(f"unknown option(s) {sorted(set(opts) - known)}; expected some of {sorted(known)}")
    arms = opts["arms"].split(",") if "arms" in opts else None
    steps, evals = int(opts.get("steps", 600)), int(opts.get("evals", 3))
    base = opts.get("base", "cpu-demo")
    # interval=0.3,1 samples as make demo does; the default (none) guides at every step, as earlier sweeps did
    interval = check_interval(opts.get("interval", "none"), "interval")
    where = f"for t in [{interval[0]}, {interval[1]}]" if interval else "at every step"
    print(f"bench quality: preset={base}, {steps} steps per arm, scored at {evals} checkpoints "
          f"(DDIM 30, guidance 3 {where}, {int(opts.get('per_class', 4))} samples per class)", flush=True)
    rows = sweep(arms, steps, evals, int(opts.get("threads", 0)), opts.get("out"), int(opts.get("per_class", 4)), base,
                 interval)
    print(format_table(rows))
    return {"rows": rows}
