"""Training: config, presets, the accelerate loop, checkpoints with exact resume (lessons 06, 12).

One entry point at every scale::

    python -m tld.train preset=smoke                       # seconds, on a CPU
    python -m tld.train preset=cpu-demo max_minutes=10     # the course's CPU model
    accelerate launch --num_processes 8 -m tld.train preset=... batch_size=1024

On N GPUs of one machine: ``accelerate launch --multi_gpu --num_processes N -m tld.train preset=...``;
on M machines add ``--num_machines M --machine_rank R --main_process_ip HOST --main_process_port 29500``
(or ``torchrun --nnodes M --nproc_per_node N ... -m tld.train``). The global batch stays ``batch_size``.

Randomness is *stateless*: the images, noise, times and label dropout of step s come from
generators seeded with (seed, step), and each process takes its own slice of the global batch.
So resuming needs no RNG state, 1 process and N processes see the same global batch (and give
the same weights), and every rank still draws different noise.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import diffusion
from .models import PRESETS as MODEL_PRESETS
from .models import count_parameters, create

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    # model: a preset of tld.models, with constructor overrides (CLI: model.depth=8)
    model: str = "uvit-course"
    model_overrides: dict = field(default_factory=dict)
    # data
    dataset: str = "shapes"  # shapes | digits | folder | tensors
    # dataset=folder: a folder of images with captions.jsonl/csv; dataset=tensors: a .safetensors file
    # with "images" [N, C, H, W] (pixels in [-1, 1] or scaled latents) and "labels" [N] or "text" [N, D]
    data_root: str = ""
    image_size: int = 32
    dataset_length: int = 1_000_000  # procedural datasets: how many distinct images
    conditioning: str = "class"  # class | none | text (pooled text: a tensors file's, or text_encoder's)
    # conditioning=text on captioned data (shapes, folder): the text encoder is "tinyclip" (trained here
    # first, saved in out_dir/text_encoder) or a saved encoder's folder; the codec is "" (pixels),
    # "tiny-vae" (trained here first, saved in out_dir/codec) or a saved codec's folder. Both run once
    # over the first cache_items items into cache_dir (default out_dir/cache), which training then reads,
    # and the run ends by saving a TextToImage pipeline in out_dir/pipeline.
    text_encoder: str = ""
    codec: str = ""
    cache_dir: str = ""
    cache_items: int = 20_000
    encoder_steps: int = 300  # TinyCLIP training steps (text_encoder=tinyclip)
    vae_steps: int = 800  # small VAE training steps (codec=tiny-vae)
    class_dropout: float = 0.1  # classifier-free guidance: labels replaced by the null class
    # diffusion
    schedule: str = "vp-cosine"
    prediction: str = "v"
    time_sampler: str = "uniform"
    # optimisation
    batch_size: int = 64  # the GLOBAL batch; fixed whatever the number of processes
    grad_accum: int = 1  # micro-batches per process per step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    lr_schedule: str = "cosine"  # constant | cosine
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop training after this long (0: no time limit); cosine follows max_steps
    stop_at: int = 0  # stop this run at this step (an interruption; the lr schedule still follows max_steps)
    # speed and memory
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU only: ~100x slower on CPU)
    gradient_checkpointing: bool = False
    attn_backend: str = "sdpa"
    compile: bool = False
    # GPUs sum some gradients with atomics, so two identical runs differ in the last bits; this picks
    # deterministic kernels only (slower), for bit-identical reruns and resumes on a GPU. A CPU is already.
    deterministic: bool = False
    threads: int = 0  # torch.set_num_threads (0: leave torch's default)
    num_workers: int = 0
    # output
    out_dir: str = "runs/default"
    log_every: int = 25
    sample_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    sample_steps: int = 50
    sample_sampler: str = "ddim"
    sample_guidance: float = 1.0
    seed: int = 0
    resume: bool = False
    progress: bool = True


PRESETS: dict[str, dict] = {
    # seconds on a CPU: the tests' and papermill's preset
    "smoke": dict(model="uvit-tiny", image_size=16, batch_size=16, max_steps=20, warmup_steps=5,
                  log_every=5, sample_steps=5, out_dir="runs/smoke"),
    # the course's CPU model (make demo): see data/pretrained/shapes-cond/README.md
    # x0 prediction learns the shapes far sooner than v on this budget (measured at equal steps, shape
    # accuracy of samples at step 750: x0 0.54, v 0.37; see data/pretrained/shapes-cond/README.md)
    "cpu-demo": dict(model="uvit-course", image_size=32, batch_size=64, max_steps=1000, max_minutes=10,
                     warmup_steps=50, lr=2e-3, prediction="x0", sample_guidance=3.0, out_dir="runs/demo",
                     save_every=200),
    # the course's text-to-image model (data/pretrained/shapes-t2i): the TLD denoiser cross-attending to
    # TinyCLIP's pooled caption, on 16x16x4 latents of a small VAE (PSNR 38 dB on shapes); the recipe of
    # cpu-demo otherwise. Trains its encoders first (~5 min), then ~45 min on one CPU thread. (U-ViT with
    # the pooled caption as one token learned color but not position: position 0.17 at step 2000, where
    # this model is at 1.00 by step 750; see data/pretrained/shapes-t2i/README.md)
    "shapes-t2i": dict(model="tld-course", model_overrides={"patch_size": 2}, dataset="shapes", image_size=32,
                       conditioning="text", text_encoder="tinyclip", codec="tiny-vae", cache_items=20_000,
                       batch_size=64, max_steps=3000, warmup_steps=50, lr=2e-3, prediction="x0",
                       class_dropout=0.1, sample_guidance=3.0, sample_steps=20, sample_sampler="dpm++2m",
                       save_every=250, keep_checkpoints=20, out_dir="runs/shapes-t2i"),
}

# GPU recipes: the papers' optimiser, lr, weight decay, betas, EMA, warmup and batch (REFERENCES.md "Recipes").
# They read a ``dataset=tensors`` file that is NOT shipped (CIFAR-10 pixels, ImageNet / text-image latents:
# see GPU_RECIPES below for how to make one); on a machine without it they stop with a FileNotFoundError.
PRESETS.update({
    # U-ViT S/2 on CIFAR-10 (Bao et al. 2023, Table 7 / configs/cifar10_uvit_small.py): unconditional, eps, VP.
    "uvit-s2-cifar10": dict(model="uvit-s/2", dataset="tensors", data_root="data/cifar10/train.safetensors",
                            image_size=32, conditioning="none", schedule="vp-linear", prediction="eps",
                            batch_size=128, lr=2e-4, weight_decay=0.03, beta1=0.99, beta2=0.999,
                            warmup_steps=2500, lr_schedule="constant", ema_decay=0.9999, max_steps=500_000,
                            mixed_precision="bf16", log_every=100, save_every=10_000, sample_every=10_000,
                            sample_sampler="dpm++2m", sample_steps=50, out_dir="runs/uvit-s2-cifar10"),
    # DiT-XL/2 on ImageNet-256 SD-VAE latents x 0.18215 (Peebles & Xie 2023): AdamW 1e-4, wd 0, constant lr,
    # no warmup, EMA 0.9999, batch 256, label dropout 0.1. Ours predicts eps only (no learned sigma / VLB term).
    "dit-xl2-imagenet": dict(model="dit-xl/2", model_overrides={"learn_sigma": False}, dataset="tensors",
                             data_root="data/imagenet256-latents/train.safetensors", image_size=32,
                             conditioning="class", class_dropout=0.1, schedule="vp-linear", prediction="eps",
                             batch_size=256, lr=1e-4, weight_decay=0.0, beta1=0.9, beta2=0.999, warmup_steps=0,
                             lr_schedule="constant", grad_clip=0.0, ema_decay=0.9999, max_steps=400_000,
                             mixed_precision="bf16", log_every=100, save_every=20_000, sample_every=20_000,
                             sample_sampler="ddim", sample_steps=50, sample_guidance=4.0,
                             out_dir="runs/dit-xl2-imagenet"),
    # TLD 100M, 256px text-to-image (apapiu/transformer_latent_diffusion): SDXL-VAE latents / 8 (4x32x32),
    # pooled CLIP (768), x0 target, rectified schedule, sigma ~ Beta(1, 2.5), Adam 3e-4, EMA 0.999, batch 256,
    # text dropped to the zero vector 15% of the time.
    "tld-256": dict(model="tld-100m", dataset="tensors", data_root="data/text-latents/train.safetensors",
                    image_size=32, conditioning="text", class_dropout=0.15, schedule="rectified", prediction="x0",
                    time_sampler="beta", batch_size=256, lr=3e-4, weight_decay=0.0, beta1=0.9, beta2=0.999,
                    warmup_steps=0, lr_schedule="constant", ema_decay=0.999, max_steps=260_000,
                    mixed_precision="bf16", log_every=100, save_every=10_000, sample_every=10_000,
                    sample_sampler="dpm++2m", sample_steps=20, sample_guidance=4.0, out_dir="runs/tld-256"),
})

GPU_RECIPES = """\
GPU presets. Expected time on one A100-80GB in bf16, estimated from the training FLOPs per image
(torch.utils.flop_counter, forward + backward) at 40% of the 312 TFLOP/s bf16 peak:

  preset            model     data (a dataset=tensors file)                  batch  steps  GFLOP/img  ~1 A100
  uvit-s2-cifar10   uvit-s/2  CIFAR-10 train, pixels in [-1, 1], 3x32x32      128   500K     73     ~11 h
  dit-xl2-imagenet  dit-xl/2  ImageNet-256 SD-VAE latents x 0.18215, labels   256   400K    712     ~7 days
  tld-256           tld-100m  SDXL-VAE latents / 8, pooled CLIP 'text' [768]  256   260K    139     ~21 h

The tensors file is one .safetensors with "images" [N, C, H, W] float and "labels" [N] int (class presets)
or "text" [N, 768] float (tld-256); make it once with the VAE and CLIP encoders (the latents cache of lesson 10).
Launch on N GPUs of one machine (the global batch stays the preset's; add grad_accum=K if it does not fit):

  accelerate launch --multi_gpu --num_processes N -m tld.train preset=dit-xl2-imagenet data_root=/path/file

and on M machines: add --num_machines M --machine_rank R --main_process_ip HOST --main_process_port 29500.
"""


def config_from_args(args: list[str]) -> TrainConfig:
    """Build a config from ``preset=NAME key=value ...`` (later keys win)."""
    pairs = []
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r} (for example: preset=smoke max_steps=100)")
        k, v = arg.split("=", 1)
        pairs.append((k.strip().lstrip("-").replace("-", "_"), v))
    values: dict = {}
    for k, v in pairs:
        if k == "preset":
            if v not in PRESETS:
                raise ValueError(f"unknown preset {v!r}; available: {', '.join(sorted(PRESETS))}")
            values.update(PRESETS[v])
    overrides = {}
    names = {f.name: f for f in fields(TrainConfig)}
    for k, v in pairs:
        if k == "preset":
            continue
        if k.startswith("model."):
            overrides[k[len("model."):]] = _parse_value(v)
            continue
        if k not in names:
            raise ValueError(f"unknown config key {k!r}; valid keys: {', '.join(sorted(names))} "
                             f"(and model.<arg> for model constructor overrides)")
        values[k] = _coerce(names[k], v)
    cfg = TrainConfig(**values)
    cfg.model_overrides = {**cfg.model_overrides, **overrides}
    validate(cfg)
    return cfg


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _coerce(f: dataclasses.Field, v: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return v.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(float(v)) if float(v).is_integer() else int(v)
        if kind == "float":
            return float(v)
        if kind == "dict":
            return dict(ast.literal_eval(v))
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {f.name!r} expects a {kind}, got {v!r}") from None
    return v


def validate(cfg: TrainConfig) -> None:
    choices = {
        "dataset": ("shapes", "digits", "folder", "tensors"),
        "conditioning": ("class", "none", "text"),
        "schedule": tuple(diffusion.SCHEDULES),
        "prediction": diffusion.PREDICTIONS,
        "time_sampler": diffusion.TIME_SAMPLERS,
        "lr_schedule": ("constant", "cosine"),
        "mixed_precision": ("no", "fp16", "bf16"),
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not one of {allowed}")
    if cfg.model not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {cfg.model!r}; available: {', '.join(sorted(MODEL_PRESETS))}")
    for key in ("batch_size", "grad_accum", "max_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if cfg.dataset == "folder" and not cfg.data_root:
        raise ValueError("dataset=folder needs data_root=<folder with images and captions.jsonl/csv>")
    if cfg.conditioning == "text" and cfg.dataset not in ("tensors", "shapes", "folder"):
        raise ValueError(f"conditioning=text needs captions (dataset=shapes or folder) or a tensors file with a "
                         f"'text' tensor, got dataset={cfg.dataset!r}")
    if cfg.conditioning == "text" and cfg.dataset != "tensors" and not cfg.text_encoder:
        raise ValueError(f"conditioning=text on dataset={cfg.dataset} needs text_encoder=tinyclip (trained "
                         f"here) or text_encoder=<a saved text encoder's folder>")
    if (cfg.text_encoder or cfg.codec) and not (cfg.conditioning == "text" and cfg.dataset != "tensors"):
        raise ValueError(f"text_encoder and codec are used with conditioning=text on captioned data; got "
                         f"conditioning={cfg.conditioning!r}, dataset={cfg.dataset!r}")
    if cfg.cache_items < 1:
        raise ValueError(f"cache_items must be >= 1, got {cfg.cache_items}")


# ---------------------------------------------------------------------------------------------
# Data: a stateless, resumable, rank-sharded order over the dataset
# ---------------------------------------------------------------------------------------------


def build_dataset(cfg: TrainConfig):
    from . import data

    if cfg.dataset == "shapes":
        return data.ShapesDataset(size=cfg.image_size, seed=cfg.seed, length=cfg.dataset_length)
    if cfg.dataset == "digits":
        return data.DigitsDataset(size=cfg.image_size, seed=cfg.seed, channels=3)
    if cfg.dataset == "tensors":
        return TensorFileDataset(cfg.data_root, cfg.image_size, cfg.conditioning)
    return data.CaptionedImageFolder(cfg.data_root, size=cfg.image_size)


TRAINED_ENCODERS = {"text_encoder": "tinyclip", "codec": "tiny-vae"}


def fit_one_cycle(model: nn.Module, loss_at, steps: int, lr: float, weight_decay: float, pct_start: float = 0.1,
                  progress: bool = False, every: int = 50, digits: int = 4) -> nn.Module:
    """AdamW with a one-cycle learning rate, `steps` times `loss_at(step)`; returns the model in eval mode.

    The course's small helper models (the VAE, TinyCLIP, the shapes classifier) all train this way.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.{digits}f}  {time.perf_counter() - t0:.1f}s")
    return model.eval()


def encoder_folder(spec: str, out_dir, name: str) -> Path | None:
    """Where a run's text encoder or codec lives: trained by the run (spec "tinyclip" / "tiny-vae") in
    out_dir/<name>, or the saved folder the spec names; None for no codec (pixels)."""
    if not spec:
        return None
    return Path(out_dir) / name if spec == TRAINED_ENCODERS[name] else Path(spec)


def prepare_text_encoders(cfg: TrainConfig, accelerator, out_dir: Path):
    """(text encoder, codec or None) for conditioning=text on captioned data; trained here when asked.

    The main process trains and saves them first; the others (and a resumed run) load the saved folders.
    """
    from .autoencoder import load_codec, train_vae
    from .text import load_text_encoder, train_tiny_clip

    makers = {"text_encoder": lambda: train_tiny_clip(steps=cfg.encoder_steps, seed=cfg.seed,
                                                      image_size=cfg.image_size),
              "codec": lambda: train_vae(steps=cfg.vae_steps, batch_size=32, widths=(16, 32), seed=cfg.seed,
                                         image_size=cfg.image_size)}

    def get(spec, name):
        folder = encoder_folder(spec, out_dir, name)
        if folder is None:
            return None
        if spec != TRAINED_ENCODERS[name]:
            if not folder.exists():
                raise FileNotFoundError(f"{name}={spec!r}: no such folder (expected a saved {name}, or "
                                        f"{TRAINED_ENCODERS[name]} to train one)")
        elif not (folder / "config.json").is_file() and not (folder / "tld_codec.json").is_file():
            if accelerator.is_main_process:
                print(f"training the {name} ({spec}) first; it is saved in {folder}")
                makers[name]().save_pretrained(folder)
        return folder

    with accelerator.main_process_first():
        enc, codec = get(cfg.text_encoder, "text_encoder"), get(cfg.codec, "codec")
    return load_text_encoder(enc), (load_codec(codec) if codec else None)


class TextCached(torch.utils.data.Dataset):
    """A `tld.cache` folder as the loop reads it: {'image': latent, 'text': pooled embedding}."""

    def __init__(self, folder):
        from .cache import CachedDataset

        self.cache = CachedDataset(folder)

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        item = self.cache[i]
        return {"image": item["image"], "text": item["pooled"]}


def cache_text_dataset(cfg: TrainConfig, accelerator, dataset, text_encoder, codec, out_dir: Path):
    from .cache import build_cache

    n = min(cfg.cache_items, len(dataset))
    root = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    with accelerator.main_process_first():
        if accelerator.is_main_process and cfg.progress:
            print(f"encoding {n} images and captions once into {root}")
        folder = build_cache(dataset, root, codec=codec, text_encoder=text_encoder, n=n, batch_size=256)
    return TextCached(folder)


class TensorFileDataset(torch.utils.data.Dataset):
    """Precomputed tensors in one .safetensors file: "images" [N, C, H, W] and "labels" [N] or "text" [N, D].

    The GPU presets train on these (CIFAR-10 pixels, VAE latents, pooled text embeddings); the file is
    made once, outside the loop, so training reads no images and runs no encoder.
    """

    def __init__(self, path, image_size: int, conditioning: str = "class"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset=tensors needs data_root=<a .safetensors file with 'images' [N, C, {image_size}, "
                f"{image_size}] and 'labels' or 'text'>, but {str(path)!r} does not exist. The GPU presets' "
                f"data (CIFAR-10 / ImageNet or text-image latents) is not shipped and cannot be downloaded "
                f"here; make the file on a machine with the data (see tld.train.GPU_RECIPES)")
        t = load_file(str(path))
        if "images" not in t or t["images"].ndim != 4 or t["images"].shape[-1] != image_size:
            got = tuple(t["images"].shape) if "images" in t else f"keys {sorted(t)}"
            raise ValueError(f"{path}: expected 'images' [N, C, {image_size}, {image_size}], got {got}")
        need = {"class": "labels", "text": "text"}.get(conditioning)
        if need and need not in t:
            raise ValueError(f"{path}: conditioning={conditioning} needs a {need!r} tensor; found {sorted(t)}")
        self.images = t["images"].float()
        self.labels = t["labels"].long() if conditioning == "class" else None
        self.text = t["text"].float() if conditioning == "text" else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if self.text is not None:
            item["text"] = self.text[i]
        return item


def _step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    # one independent stream per (seed, step, purpose); nothing to save for an exact resume
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps start_step.., this rank's micro-batches of the global batch.

    The global order is a fresh permutation of the dataset per epoch, seeded by (seed, epoch).
    Global batch s is positions [s*B, (s+1)*B) of that order; micro-batch a of rank r takes the
    slice a*P*b + r*b .. + b of it (b = B / (P*A)), so the union over ranks and micro-batches is
    the same set of examples whatever P and A are.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, accum: int,
                 start_step: int, max_steps: int):
        if global_batch % (world * accum):
            raise ValueError(f"batch_size {global_batch} must be divisible by processes x grad_accum "
                             f"= {world} x {accum}")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} examples, fewer than one batch of {global_batch}")
        self.n, self.B, self.seed = n, global_batch, seed
        self.rank, self.world, self.accum = rank, world, accum
        self.micro = global_batch // (world * accum)
        self.start_step, self.max_steps = start_step, max_steps
        self._perm_epoch, self._perm = -1, None

    def _position(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.n)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=_step_generator(self.seed, epoch, 5)).tolist()
            self._perm_epoch = epoch
        return self._perm[offset]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for a in range(self.accum):
                first = step * self.B + a * self.world * self.micro + self.rank * self.micro
                yield [self._position(p) for p in range(first, first + self.micro)]

    def __len__(self):
        return (self.max_steps - self.start_step) * self.accum


def step_randomness(cfg: TrainConfig, step: int, shape: tuple, num_classes: int):
    """The global batch's times, noise and label-dropout mask for one step (same on every rank).

    ``num_classes`` > 0 (or -1 for text conditioning) draws the condition-dropout mask.
    """
    g = _step_generator(cfg.seed, step, 1)
    schedule = diffusion.get_schedule(cfg.schedule)
    t = diffusion.sample_t(shape[0], cfg.time_sampler, generator=g, t_min=schedule.t_min, t_max=schedule.t_max)
    eps = torch.randn(shape, generator=g)
    drop = torch.rand(shape[0], generator=g) < cfg.class_dropout if num_classes else None
    return t, eps, drop


def rank_slice(global_batch: int, rank: int, world: int, accum: int, micro_step: int) -> slice:
    """The positions of the global batch that ``rank`` uses in micro-batch ``micro_step``.

    The same layout as StepBatchSampler: so rank r's noise and times are rows [slice] of
    step_randomness's global draw, disjoint from every other rank's (each rank draws its own noise).
    """
    micro = global_batch // (world * accum)
    lo = micro_step * world * micro + rank * micro
    return slice(lo, lo + micro)


def rank_randomness(cfg: TrainConfig, step: int, shape: tuple, num_classes: int, rank: int, world: int,
                    micro_step: int = 0):
    """What one rank draws for one micro-batch: its rows of the step's (times, noise, dropout mask)."""
    t, eps, drop = step_randomness(cfg, step, (cfg.batch_size, *shape), num_classes)
    sl = rank_slice(cfg.batch_size, rank, world, cfg.grad_accum, micro_step)
    return t[sl], eps[sl], None if drop is None else drop[sl]


# ---------------------------------------------------------------------------------------------
# EMA, learning rate, checkpoints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    pe, pm = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(pe) != len(pm):
        raise ValueError(f"ema has {len(pe)} parameter tensors, the model {len(pm)}: not the same architecture")
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(pe, pm)):
        torch._foreach_lerp_(pe, pm, 1 - decay)  # one fused launch per group instead of one per tensor
    else:
        for a, b in zip(pe, pm):
            a.lerp_(b.to(a.device, a.dtype), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay_at(step: int, decay: float) -> float:
    # warm up the average so early samples are not dominated by the random init
    return min(decay, (1 + step) / (10 + step))


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_kwargs(cfg: TrainConfig, dataset) -> dict:
    """What the model is built with: the preset, the data's shape and classes, and overrides."""
    item = dataset[0]
    kw = dict(img_size=int(item["image"].shape[-1]), in_chans=int(item["image"].shape[0]),
              num_classes=getattr(dataset, "num_classes", 0) if cfg.conditioning == "class" else 0,
              attn_backend=cfg.attn_backend)
    if cfg.conditioning == "text":
        kw["text_dim"] = int(item["text"].shape[-1])
        from .models import PRESETS

        if cfg.model in PRESETS and PRESETS[cfg.model].builder.startswith("uvit:"):
            kw["text_len"] = 1  # U-ViT reads the pooled vector as one context token
    return {**kw, **cfg.model_overrides}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, ema: nn.Module, optimizer, cfg: TrainConfig,
                    model_kw: dict, extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step_XXXXXXX/ atomically: a temp folder, then rename, then point 'latest' at it."""
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=ckpt_root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  str(tmp / "ema.safetensors"))
        torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
        meta = {"step": step, "train_config": asdict(cfg), "model": cfg.model, "model_kwargs": model_kw,
                **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json(ckpt_root / "latest.json", {"step": step, "path": final.name})
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["path"]
    return path if path.exists() else None


def load_model(path, which: str = "ema", device="cpu") -> nn.Module:
    """Load a trained model from a checkpoint folder (or a run folder, taking its latest checkpoint).

    ``which`` is ``ema`` (what samples should come from) or ``model`` (the raw weights).
    """
    path = Path(path)
    if (path / "checkpoints").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}")
        path = found
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a tld checkpoint: {cfg_file} is missing")
    meta = json.loads(cfg_file.read_text())
    weights = path / f"{which}.safetensors"
    if not weights.exists():
        weights = path / "model.safetensors"
    model = create(meta["model"], **meta["model_kwargs"])
    state = load_file(str(weights), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights} does not fit model {meta['model']!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.train_config = meta.get("train_config", {})
    model.model_kwargs = meta["model_kwargs"]
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Sampling helpers used during training and by the demo
# ---------------------------------------------------------------------------------------------


def sample_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def generate(model: nn.Module, cfg_or_dict, labels: torch.Tensor | None, n: int | None = None, *, steps: int = 50,
             sampler: str = "ddim", guidance: float = 1.0, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Samples in [-1, 1] from a trained model, for class labels (or n unconditional samples)."""
    from .samplers import sample

    c = cfg_or_dict if isinstance(cfg_or_dict, dict) else asdict(cfg_or_dict)
    p = next(model.parameters())
    n = len(labels) if labels is not None else n
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.in_chans, model.img_size, model.img_size, generator=g).to(p.device)
    null = None
    if labels is not None:
        labels = labels.to(p.device)
        null = torch.full_like(labels, model.num_classes)
    x = sample(model, noise, c["schedule"], sampler=sampler, steps=steps, prediction=c["prediction"],
               cond=labels, null_cond=null, guidance=guidance, generator=g, progress=progress)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: TrainConfig, accelerator=None) -> dict:
    """Run (or resume) training. Returns a summary dict (steps, seconds, final loss, out_dir)."""
    if not cfg.deterministic:
        return _train(cfg, accelerator)
    # cuBLAS is deterministic only with a fixed workspace; set before its first use in this process
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        return _train(cfg, accelerator)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _train(cfg: TrainConfig, accelerator=None) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if accelerator is None:
        _forget_other_precision(cfg.mixed_precision)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if cfg.mixed_precision != "no" and accelerator.device.type == "cpu":
        warnings.warn(f"mixed_precision={cfg.mixed_precision} on a CPU is far slower than fp32; use it on GPUs",
                      stacklevel=2)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    out_dir = Path(cfg.out_dir)

    dataset = build_dataset(cfg)
    num_classes = getattr(dataset, "num_classes", 0) if cfg.conditioning == "class" else 0
    text = cfg.conditioning == "text"
    text_encoder = codec = None
    if text and cfg.dataset != "tensors":
        text_encoder, codec = prepare_text_encoders(cfg, accelerator, out_dir)
        dataset = cache_text_dataset(cfg, accelerator, dataset, text_encoder, codec, out_dir)
    schedule = diffusion.get_schedule(cfg.schedule)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model_kw = model_kwargs(cfg, dataset)
    model = create(cfg.model, **model_kw)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    ema = create(cfg.model, **model_kw)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    # the fused kernel updates every tensor in one launch on a GPU (same update, fp32 rounding apart)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=accelerator.device.type == "cuda")

    start_step = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            if main:
                print(f"resume=true but no checkpoint in {out_dir}; starting from step 0")
        else:
            meta = json.loads((ckpt / "config.json").read_text())
            if meta["model"] != cfg.model or meta["model_kwargs"] != json.loads(json.dumps(model_kw)):
                raise ValueError(f"checkpoint {ckpt} was made for model {meta['model']!r} with {meta['model_kwargs']}, "
                                 f"not {cfg.model!r} with {model_kw}")
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"])
            start_step = meta["step"]
            if main:
                print(f"resumed from {ckpt} at step {start_step}")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "config.json", {"train_config": asdict(cfg), "model_kwargs": model_kw})

    ema.to(accelerator.device)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the plain module (not the torch.compile wrapper), so checkpoints and the EMA see the usual names
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)

    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, rank, world, cfg.grad_accum,
                               start_step, cfg.max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
    batch_iter = iter(loader)
    img_shape = tuple(dataset[0]["image"].shape)

    log_path = out_dir / "log.jsonl"
    if main and start_step == 0 and log_path.exists():
        log_path.unlink()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (main and cfg.progress), desc="training",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    step, last_loss, losses = start_step, float("nan"), []
    model.train()
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    while step < end:
        if cfg.max_minutes and _should_stop(accelerator, time.perf_counter() - t_start > 60 * cfg.max_minutes):
            break
        t_all, eps_all, drop_all = step_randomness(cfg, step, (cfg.batch_size, *img_shape),
                                                   -1 if text else num_classes)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        step_loss = torch.zeros((), device=accelerator.device)
        for a in range(cfg.grad_accum):
            batch = next(batch_iter)
            sl = rank_slice(cfg.batch_size, rank, world, cfg.grad_accum, a)
            x0 = batch["image"].to(accelerator.device)
            t = t_all[sl].to(accelerator.device)
            eps = eps_all[sl].to(accelerator.device)
            cond = None
            if num_classes:
                cond = batch["label"].to(accelerator.device).clone()
                cond[drop_all[sl].to(accelerator.device)] = num_classes  # the null class
            elif text:
                cond = batch["text"].to(accelerator.device).clone()
                cond[drop_all[sl].to(accelerator.device)] = 0.0  # TLD's null text is the zero vector
            x_t = diffusion.add_noise(x0, eps, t, schedule)
            sync = a == cfg.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                pred = model(x_t, t, cond)
                loss = diffusion.loss(pred, x0, eps, t, schedule, cfg.prediction).mean() / cfg.grad_accum
            accelerator.backward(loss)
            step_loss += loss.detach()
        # the logged loss is the mean over every process's micro-batches
        mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
        if not math.isfinite(mean_loss):
            last = latest_checkpoint(out_dir)
            raise NonFiniteLoss(f"loss became {mean_loss} at step {step}; stopping without saving. "
                                f"The last good checkpoint is {last if last else '(none yet)'}")
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, raw_model, ema_decay_at(step, cfg.ema_decay))
        step += 1
        last_loss = mean_loss
        losses.append(mean_loss)
        bar.update(1)
        if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr_at(cfg, step - 1):.2e}")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": recent, "lr": lr_at(cfg, step - 1),
                                    "seconds": round(time.perf_counter() - t_start, 3)}) + "\n")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            _save(accelerator, out_dir, step, raw_model, ema, optimizer, cfg, model_kw)
        if main and cfg.sample_every and step % cfg.sample_every == 0:
            save_samples(ema, cfg, num_classes, out_dir / "samples" / f"step_{step:07d}.png", dataset=dataset,
                         codec=codec)
    bar.close()
    seconds = time.perf_counter() - t_start
    _save(accelerator, out_dir, step, raw_model, ema, optimizer, cfg, model_kw)
    if main:
        save_samples(ema, cfg, num_classes, out_dir / "samples" / f"step_{step:07d}.png", dataset=dataset,
                     codec=codec)
        if text_encoder is not None:
            save_pipeline(cfg, ema, text_encoder, codec, model_kw, out_dir / "pipeline")
    steps_done = step - start_step
    summary = {"steps": step, "steps_this_run": steps_done, "seconds": seconds,
               "steps_per_second": steps_done / seconds if seconds > 0 else float("nan"),
               "final_loss": last_loss, "out_dir": str(out_dir), "num_processes": world,
               "parameters": count_parameters(raw_model)}
    if main:
        _write_json(out_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one global state per process and refuses a second Accelerator with another
    precision; a single-process caller (a notebook, the tests) that switches precision gets a fresh one."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision \
            and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()


def _should_stop(accelerator, local: bool) -> bool:
    # every rank must stop at the same step, or DDP deadlocks: the main process decides
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    from accelerate.utils import broadcast

    return bool(broadcast(flag, from_process=0).item())


def _save(accelerator, out_dir, step, model, ema, optimizer, cfg, model_kw):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out_dir, step, model, ema, optimizer, cfg, model_kw, keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def save_pipeline(cfg: TrainConfig, ema: nn.Module, text_encoder, codec, model_kw: dict, folder: Path) -> Path:
    """The EMA denoiser with its text encoder and codec as one TextToImage folder (tld.pipeline)."""
    import copy

    from .pipeline import TextToImage

    pipe = TextToImage.for_training_run(copy.deepcopy(ema).cpu(), text_encoder, codec, asdict(cfg), model_kw)
    return pipe.save_pretrained(folder)


def save_samples(ema: nn.Module, cfg: TrainConfig, num_classes: int, path: Path, per_class: int = 2,
                 dataset=None, codec=None) -> Path:
    from .viz import image_grid

    if cfg.conditioning == "text":
        images = _generate_text(ema, cfg, dataset)
    else:
        labels = sample_grid_labels(num_classes, per_class) if num_classes else None
        images = generate(ema, cfg, labels, n=16, steps=cfg.sample_steps, sampler=cfg.sample_sampler,
                          guidance=cfg.sample_guidance, seed=cfg.seed)
    if codec is not None:  # latents -> pixels
        with torch.no_grad():
            images = codec.decode(images.to(next(codec.parameters()).device)).clamp(-1, 1)
    if images.shape[1] != 3:  # latents without their codec: show the first three channels
        images = images[:, :3]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid((images.cpu() + 1) / 2, nrow=2 * per_class if num_classes else 4, scale=2).save(path)
    return path


@torch.no_grad()
def _generate_text(model: nn.Module, cfg: TrainConfig, dataset, n: int = 16) -> torch.Tensor:
    """Samples for the first n text embeddings of a tensors dataset (null text = zeros)."""
    from .samplers import sample

    p = next(model.parameters())
    cond = torch.stack([dataset[i]["text"] for i in range(min(n, len(dataset)))]).to(p.device)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(len(cond), model.in_chans, model.img_size, model.img_size, generator=g).to(p.device)
    x = sample(model, noise, cfg.schedule, sampler=cfg.sample_sampler, steps=cfg.sample_steps,
               prediction=cfg.prediction, cond=cond, null_cond=torch.zeros_like(cond),
               guidance=cfg.sample_guidance, generator=g, progress=False)
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        print("presets:", ", ".join(sorted(PRESETS)))
        print(GPU_RECIPES)
        print("keys:", ", ".join(f.name for f in fields(TrainConfig)))
        return 0
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg)
    except FileNotFoundError as e:  # a GPU preset's data file, a folder dataset: say what is missing, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"trained {summary['steps_this_run']} steps in {summary['seconds']:.1f} s "
              f"({summary['steps_per_second']:.2f} steps/s), final loss {summary['final_loss']:.4f}; "
              f"outputs in {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
