"""The course's main job (``make demo``): train the CPU model, then compare it with the reference.

    python -m tld.demo                       # 10-minute budget, writes runs/demo/ and samples.png
    python -m tld.demo max_minutes=2 out=x.png
    python -m tld.demo guidance_interval=none   # guide at every step, not only for t in [0.3, 1]
    python -m tld.demo preset=cpu-demo       # the pixel-space U-ViT instead (reference: shapes-cond-uvit)

It trains the class-conditional TLD denoiser on the latents of the shipped shapes VAE with
``python -m tld.train preset=cpu-demo-latent`` (latent diffusion: the images are encoded once by
``shapes-t2i``'s codec, and samples are decoded by it), samples every class from its EMA weights and from the
shipped reference (``tld.assets.path("shapes-cond")``, the same recipe trained for 4,000 steps instead of
1,200), reads color and shape two ways (``tld.quality.read_samples``: the shapes classifier and the geometric
reader), and writes one picture of both.

Both panels are guided only while t >= 0.3 (``GUIDANCE_INTERVAL``; Kynkäänniemi et al. 2024): guidance at
low noise pinches squares into X shapes and notches circles (lesson 08 shows both), and the geometric
reader's IoU of the pixel U-ViT's samples rises from 0.89 to 0.95 without it (`tld/assets/shapes-cond-uvit`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from . import assets, io
from . import train as T
from .autoencoder import load_codec
from .config import parse_key_values
from .data import ShapesDataset
from .quality import GUIDANCE_INTERVAL, read_samples
from .runs import codec_folder, load_model, model_weights
from .samplers import check_interval
from .viz import to_uint8

SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpm++2m": "DPM-Solver++(2M)"}
PRESET = "cpu-demo-latent"   # what make demo trains, unless preset= says
# the shipped model (tld.assets) each preset's run is shown beside, unless reference= says: the same recipe, longer
REFERENCES = {"cpu-demo-latent": "shapes-cond", "cpu-demo": "shapes-cond-uvit"}


@torch.no_grad()
def class_samples(model, train_config: dict, per_class: int = 4, steps: int = 50, guidance: float = 1.0,
                  seed: int = 0, guidance_interval: tuple[float, float] | None = None,
                  codec=None) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of every class, in [-1, 1], with their labels (a latent model's decoded by ``codec``)."""
    labels = T.sample_grid_labels(model.num_classes, per_class)
    images = T.generate(model, train_config, labels, steps=steps, guidance=guidance, seed=seed,
                        sampler=train_config.get("sample_sampler", "ddim"), guidance_interval=guidance_interval,
                        clamp=codec is None)
    if codec is not None:
        images = codec.decode(images).clamp(-1, 1)
    return images, labels


def model_and_codec(path):
    """A shipped or trained class model and the codec that decodes its samples (None for a pixel model)."""
    folder = codec_folder(path)
    return load_model(path), (load_codec(folder) if folder is not None else None)


def labelled_grid(panels: list[tuple[str, torch.Tensor]], labels: torch.Tensor, class_names: list[str],
                  per_class: int, scale: int = 3):
    """One PIL picture: a row per class, a block of columns per panel (title on top), class names left."""
    font = ImageFont.load_default()
    h, w = panels[0][1].shape[-2:]
    cell_w, cell_h, pad = w * scale, h * scale, 2
    label_w, title_h, gap = 110, 18, 16
    n_cls = len(class_names)
    block_w = per_class * (cell_w + pad)
    width = label_w + len(panels) * (block_w + gap)
    height = title_h + n_cls * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, images) in enumerate(panels):
        x0 = label_w + p * (block_w + gap)
        draw.text((x0, 3), title, fill="black", font=font)
        pix = to_uint8(images)
        for k in range(len(labels)):
            r, c = int(labels[k]), k % per_class
            tile = Image.fromarray(pix[k]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0 + c * (cell_w + pad), title_h + r * (cell_h + pad)))
    for r, name in enumerate(class_names):
        draw.text((4, title_h + r * (cell_h + pad) + cell_h // 2 - 5), name, fill="black", font=font)
    return canvas


def export(checkpoint, dest, fp16: bool = False) -> Path:
    """Write a checkpoint's EMA weights and its config into ``dest`` (what ships in tld/assets):
    config.json + model.safetensors, atomically, keeping the folder's README.md. ``checkpoint`` may also be an
    exported folder (its ``model.safetensors``), ``dest`` itself included. ``fp16`` stores the
    weights in half precision (half the bytes; ``load_model`` casts them back to the model's float32)."""
    # a run's latest checkpoint, or a checkpoint, ships its EMA weights; an exported folder its model.safetensors
    meta, weights, _ = model_weights(checkpoint, "ema")
    meta.pop("optimizer", None)   # an exported model carries no optimizer state
    if fp16:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        meta["stored_dtype"] = "float16"
    codec = codec_folder(checkpoint)   # a latent model ships with the codec that decodes it, in dest/codec
    with io.atomic_folder(dest, keep=("README.md",)) as tmp:
        io.write_json(tmp / "config.json", meta)
        io.save_tensors(tmp / "model.safetensors", weights)
        if codec is not None:
            shutil.copytree(codec, tmp / "codec")
    load_model(dest)  # fails loudly if what was written does not load
    return Path(dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        fp16 = "--fp16" in argv
        args = [a for a in argv[1:] if a != "--fp16"]
        if len(args) != 2:
            print("usage: python -m tld.demo export <run or checkpoint folder> <destination> [--fp16]", file=sys.stderr)
            return 2
        print(f"exported to {export(args[0], args[1], fp16=fp16)}")
        return 0
    try:
        opts = dict(parse_key_values(argv, hint=" (e.g. max_minutes=2 out=samples.png)"))
        # guide only for t in the course's interval unless guidance_interval=lo,hi or none says otherwise
        interval = check_interval(opts.pop("guidance_interval")) if "guidance_interval" in opts else GUIDANCE_INTERVAL
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_png = Path(opts.pop("out", "samples.png"))
    per_class = int(opts.pop("per_class", 4))
    steps = int(opts.pop("steps", 50))
    # a folder, or a shipped model's name: a missing shipped model is an error that says how to get it back
    preset = str(opts.pop("preset", PRESET))
    reference = assets.resolve(opts.pop("reference", REFERENCES.get(preset, REFERENCES[PRESET])))
    train_args = [f"preset={preset}"] + [f"{k}={v}" for k, v in opts.items()]
    cfg = T.config_from_args(train_args)

    wall = time.perf_counter()
    print(f"training: python -m tld.train {' '.join(train_args)}")
    summary = T.train(cfg)
    print(f"trained {summary['steps_this_run']} steps in {summary['seconds'] / 60:.1f} min "
          f"({summary['steps_per_second']:.2f} steps/s), final loss {summary['final_loss']:.4f}")

    names = ShapesDataset(size=cfg.image_size).class_names
    guidance = cfg.sample_guidance
    panels, rows = [], []
    ours, codec = model_and_codec(cfg.out_dir)
    sampler = ours.train_config.get("sample_sampler", "ddim")   # both panels sample as their run's grids did
    images, labels = class_samples(ours, ours.train_config, per_class, steps, guidance, guidance_interval=interval,
                                   codec=codec)
    panels.append((f"this run ({summary['steps']} steps)", images))
    rows.append(("this run", read_samples(images, labels)))
    if (reference / "config.json").exists():
        ref, ref_codec = model_and_codec(reference)
        ref_images, _ = class_samples(ref, ref.train_config, per_class, steps, guidance,
                                      guidance_interval=interval, codec=ref_codec)
        meta = json.loads((reference / "config.json").read_text())
        # steps_in_all: a model trained on from another's weights (init_from) counts both runs' steps
        panels.append((f"reference ({meta.get('steps_in_all', meta.get('step', '?'))} steps)", ref_images))
        rows.append(("reference", read_samples(ref_images, labels)))
    else:
        print(f"no reference checkpoint at {reference}: showing this run only")
    labelled_grid(panels, labels, names, per_class).save(out_png)

    print(f"\n{'samples':<12}{'color acc':>10}{'shape acc':>10}{'both':>8}{'geometry: shape':>17}{'strict':>8}"
          f"   ({per_class} per class, {steps} {SAMPLER_NAMES.get(sampler, sampler)} steps, guidance {guidance}"
          f"{f' for t in [{interval[0]}, {interval[1]}]' if interval else ' at every step'})")
    for name, acc in rows:
        print(f"{name:<12}{acc['color']:>10.3f}{acc['shape']:>10.3f}{acc['both']:>8.3f}{acc['geo_shape']:>17.3f}"
              f"{acc['strict']:>8.3f}")
    print(f"\nwrote {out_png} ; wall time {(time.perf_counter() - wall) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
