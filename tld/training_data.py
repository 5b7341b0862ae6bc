"""The data side of a training run: the dataset a config names, the encoders and latent cache of text runs,
and the stateless, resumable, rank-sharded order of its batches (lessons 06, 12).

`tld.train` builds its loop from these (and re-exports them, so ``tld.train.StepBatchSampler`` still works):

- ``build_dataset(cfg)``: shapes, digits, a tensors file, `tld.prepare`'s shards or a captioned folder;
- ``prepare_text_encoders`` / ``cache_text_dataset``: a text run's encoders (trained here when asked) and
  its images and captions encoded once into a `tld.cache` folder;
- ``StepBatchSampler``, ``step_randomness``, ``rank_slice``: step s's examples, times, noise and dropout mask are
  functions of (seed, s), and each process takes its own slice of the global batch, so a resume needs no RNG
  state and 1 or N processes see the same global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from . import diffusion
from .autoencoder import finetune_decoder, load_codec, train_vae
from .cache import CachedDataset, build_cache
from .config import TrainConfig
from .data import CaptionedImageFolder, DigitsDataset, ShapesDataset
from .models import family
from .prepare import open_prepared
from .runs import TRAINED_ENCODERS, encoder_folder
from .text import load_text_encoder, train_tiny_clip

__all__ = ["shapes_positions_kwargs", "build_dataset", "tiny_vae", "prepare_text_encoders", "TextCached", "cache_text_dataset",
           "TensorFileDataset", "StepBatchSampler", "step_randomness", "rank_slice", "model_kwargs"]




def shapes_positions_kwargs(positions: str) -> dict:
    """ShapesDataset's keyword for a config's ``shapes_positions`` ("center", "top,left", ...; "" for all nine)."""
    return {"positions": tuple(p.strip() for p in positions.split(","))} if positions else {}


def build_dataset(cfg: TrainConfig):
    if cfg.dataset == "shapes":
        return ShapesDataset(size=cfg.image_size, seed=cfg.seed, length=cfg.dataset_length,
                             **shapes_positions_kwargs(cfg.shapes_positions))
    if cfg.dataset == "digits":
        return DigitsDataset(size=cfg.image_size, seed=cfg.seed, channels=3)
    if cfg.dataset == "tensors":
        return TensorFileDataset(cfg.data_root, cfg.image_size, cfg.conditioning)
    if cfg.dataset == "prepared":  # python -m tld.prepare's shards, streamed row by row
        return open_prepared(cfg.data_root, cfg.conditioning, cfg.image_size,
                             text="tokens" if cfg.text_tokens else "pooled")
    folder = CaptionedImageFolder(cfg.data_root, size=cfg.image_size)
    if cfg.conditioning == "class":  # classes from the caption file's label column, never silently none
        if min(folder.labels) < 0:
            raise ValueError(f"dataset=folder with conditioning=class (the default) needs an integer 'label' for "
                             f"every image in {str(folder.caption_file)!r}, and it has none; set conditioning=none "
                             f"(unconditional) or conditioning=text text_encoder=..., or add a label column")
        folder.num_classes = max(folder.labels) + 1
    return folder


def tiny_vae(cfg: TrainConfig):
    """codec=tiny-vae: a small VAE trained for ``vae_steps``, then its decoder alone for ``vae_decoder_steps`` on the
    frozen encoder's latents (sharper reconstructions of the same latents)."""
    vae = train_vae(steps=cfg.vae_steps, batch_size=32, widths=(16, 32), seed=cfg.seed, image_size=cfg.image_size)
    if cfg.vae_decoder_steps:
        vae = finetune_decoder(vae, steps=cfg.vae_decoder_steps, seed=cfg.seed, image_size=cfg.image_size)
    return vae


def prepare_text_encoders(cfg: TrainConfig, accelerator, out_dir: Path):
    """(text encoder or None, codec or None) for captioned or labelled data: the text encoder for
    conditioning=text, the codec (latent diffusion) for any conditioning; each trained here when asked.

    The main process trains and saves them first; the others (and a resumed run) load the saved folders.
    """
    makers = {"text_encoder": lambda: train_tiny_clip(steps=cfg.encoder_steps, seed=cfg.seed,
                                                      image_size=cfg.image_size),
              "codec": lambda: tiny_vae(cfg)}

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
    return (load_text_encoder(enc) if enc else None), (load_codec(codec) if codec else None)


class TextCached(torch.utils.data.Dataset):
    """A `tld.cache` folder as the loop reads it: {'image': latent, 'text': pooled embedding [D]}, or with
    ``tokens`` the token sequence [L, D] (CLIP's 77 last hidden states; U-ViT's text tokens)."""

    def __init__(self, folder, tokens: bool = False):
        self.cache = CachedDataset(folder)
        self.key = "tokens" if tokens else "pooled"

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        item = self.cache[i]
        return {"image": item["image"], "text": item[self.key]}


def cache_text_dataset(cfg: TrainConfig, accelerator, dataset, text_encoder, codec, out_dir: Path):
    n = min(cfg.cache_items, len(dataset))
    root = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    with accelerator.main_process_first():
        if accelerator.is_main_process and cfg.progress:
            print(f"encoding {n} images and captions once into {root}")
        folder = build_cache(dataset, root, codec=codec, text_encoder=text_encoder, n=n, batch_size=256,
                             tokens=cfg.text_tokens)
    return TextCached(folder, tokens=cfg.text_tokens)


class ClassCached(torch.utils.data.Dataset):
    """A `tld.cache` folder of latents (no text) as a class-conditional run reads it: {'image': latent,
    'label': class}; ``num_classes`` is the source dataset's, so the null class stays the same label."""

    def __init__(self, folder, num_classes: int):
        self.cache, self.num_classes = CachedDataset(folder), int(num_classes)

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        item = self.cache[i]
        return {"image": item["image"], "label": item["label"]}


def cache_latent_dataset(cfg: TrainConfig, accelerator, dataset, codec, out_dir: Path):
    """A class-conditional (or unconditional) run with a codec: the first ``cache_items`` images encoded once."""
    n = min(cfg.cache_items, len(dataset))
    root = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "cache"
    with accelerator.main_process_first():
        if accelerator.is_main_process and cfg.progress:
            print(f"encoding {n} images once into {root}")
        folder = build_cache(dataset, root, codec=codec, n=n, batch_size=256)
    return ClassCached(folder, getattr(dataset, "num_classes", 0))


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
    t = diffusion.sample_t(shape[0], cfg.time_sampler, generator=g, t_min=schedule.t_min,
                           t_max=cfg.t_max_train or schedule.t_max)
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


def model_kwargs(cfg: TrainConfig, dataset) -> dict:
    """What the model is built with: the preset, the data's shape and classes, and overrides."""
    item = dataset[0]
    kw = dict(img_size=int(item["image"].shape[-1]), in_chans=int(item["image"].shape[0]),
              num_classes=getattr(dataset, "num_classes", 0) if cfg.conditioning == "class" else 0,
              attn_backend=cfg.attn_backend)
    if cfg.conditioning == "text":
        kw["text_dim"] = int(item["text"].shape[-1])
        if family(cfg.model) == "uvit":   # the pooled vector as one context token, or the token sequence
            kw["text_len"] = int(item["text"].shape[0]) if item["text"].ndim == 2 else 1
    return {**kw, **cfg.model_overrides}
