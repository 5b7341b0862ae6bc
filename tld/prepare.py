"""Real data, encoded once into .npy shards that every GPU streams (the papers' recipes).

What fast-DiT's ``extract_features.py`` and U-ViT's ``extract_imagenet_feature.py`` do, as one command::

    python -m tld.prepare source=/data/imagenet/train out=/data/in256-sdvae size=256 \\
        codec=stabilityai/sd-vae-ft-ema flip=true
    accelerate launch --multi_gpu --num_processes 8 -m tld.prepare source=... out=...  # 8 GPUs, 8 writers
    python -m tld.train preset=dit-xl2-imagenet data_root=/data/in256-sdvae        # dataset=prepared

Sources (``source=``):
  * a folder of class subfolders (ImageNet's layout): the sorted folder names (synsets) are the labels
    0..K-1, saved as ``classes.json`` and the manifest's ``class_names``;
  * a captioned folder (``captions.jsonl``/``.csv``, as ``tld.data.CaptionedImageFolder`` reads it);
  * a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, ``imagefolder:<dir>``, or ``hf:<name>``
    (a hub name, which needs the network or the local cache). Needs ``pip install tld-course[prepare]``.

Each image is made RGB (grayscale, CMYK, palette and alpha images alike: PIL's ``convert("RGB")``), then
cut by ADM's rule (Dhariwal & Nichol 2021, ``center_crop_arr``): halve with a box filter while the
shorter side is at least twice ``size``, resize bicubically so the shorter side is ``size``, crop the
centre square. **Images smaller than size** (shorter side below ``size``): ``small=upscale`` (the default)
enlarges them by the same rule (bicubic) and counts them in the manifest's ``upscaled``; ``small=skip``
leaves them out and counts them as skipped. ``flip=true`` encodes each image and its mirror, in rows
2i and 2i+1, so the trainer sees both views as fast-DiT's flip augmentation does.

**An unreadable image** (corrupt, truncated, not an image): with ``bad=skip`` (the default) it is reported
with its path on stderr, left out, and counted (the manifest's ``skipped`` and ``skipped_examples``); with
``bad=error`` the run stops with a ValueError naming it. A file the caption list names that does not
exist is always an error (a wrong list, not a bad image).

Encoders: ``codec=none`` (pixels in [-1, 1]), a saved tld codec folder, or a diffusers ``AutoencoderKL``
(folder or cached hub id, ``scale=``), on the GPU when there is one; ``text_encoder=none``, a saved tld
text encoder, or a CLIP text model (``CLIPText``), storing ``text=pooled|tokens|both``. Batches of
``batch_size`` images, decoded by ``workers`` loader processes.

Output: ``out/shards/NNNNN/`` holds ``shard_size`` source items each (``latents.npy`` [rows, C, h, w],
``labels.npy``, ``pooled.npy``, ``tokens.npy`` + ``mask.npy``, ``captions.json``, ``items.npy`` — the
source index of each row — and ``shard.json``), each written whole or not at all (``tld.io``). Shard k
belongs to process k mod P, so every process encodes and writes its own shards and the result does not
depend on P (on several machines, ``out`` must be on a filesystem they all see). ``manifest.json``
comes **last**, written by process 0 once every shard exists: count, shapes, dtype (``dtype=float16`` by
default), label names, the encoders' identities and digests (``tld.cache``'s), the source's identity
and the settings. **Resume**: run the same command again; the
finished shards are kept and the work continues at the first unfinished one. A different command on the
same ``out`` is refused.
"""

from __future__ import annotations

import hashlib
import io as pyio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import io
from .autoencoder import DiffusersVAE, load_codec
from .cache import encoder_identity
from .config import coerce_value, parse_key_values
from .data import _IMAGE_SUFFIXES, CaptionedImageFolder
from .text import CLIPText, load_text_encoder

__all__ = ["PrepareConfig", "prepare", "adm_center_crop", "open_source", "PreparedDataset", "open_prepared",
           "manifest_codec", "manifest_text_encoder", "manifest_encoders", "iter_prepared_images",
           "prepared_captions", "main"]

FORMAT = "tld-prepared"
VERSION = 1


@dataclass
class PrepareConfig:
    source: str = ""           # a folder (class subfolders, or captions.jsonl/csv), a datasets folder, imagefolder:<dir>, hf:<name>
    out: str = ""              # the prepared folder
    size: int = 256            # the square image size (pixels) that the encoder sees
    codec: str = "none"        # none | a tld codec folder | an AutoencoderKL folder or cached hub id
    scale: float = 0.18215     # latent scale of a bare AutoencoderKL (SD's VAE: 0.18215; SDXL's: 0.13025)
    text_encoder: str = "none"  # none | a tld text encoder folder | a CLIP text model folder or cached hub id
    text: str = "pooled"       # pooled | tokens | both: what of the text encoder's output is stored
    projection: bool = True    # CLIP: the projected text embedding as pooled (TLD's 768-d for ViT-L/14)
    flip: bool = False         # also encode the mirror image (rows 2i, 2i+1)
    small: str = "upscale"     # images smaller than size: upscale (bicubic, counted) | skip
    bad: str = "skip"          # unreadable images: skip (reported and counted) | error
    dtype: str = "float16"     # float16 | float32: the stored latents and embeddings
    batch_size: int = 64
    shard_size: int = 8192     # source items per shard (a killed run loses at most one shard per process)
    workers: int = 0           # loader processes decoding images
    split: str = "train"       # datasets sources
    image_column: str = ""     # datasets sources: default the first Image feature
    label_column: str = ""     # datasets sources: default 'label' / 'labels' when present
    caption_column: str = ""   # datasets sources: default 'caption' / 'text' / 'prompt' when present
    limit: int = 0             # only the first `limit` items (0: all)
    online: bool = False       # let encoders and datasets reach the hub
    progress: bool = True


_CHOICES = {"text": ("pooled", "tokens", "both"), "small": ("upscale", "skip"), "bad": ("skip", "error"),
            "dtype": ("float16", "float32")}


def config_from_args(args: list[str]) -> PrepareConfig:
    """``["source=...", "out=...", ...]`` -> a checked PrepareConfig."""
    names = {f.name: f for f in fields(PrepareConfig)}
    values = {}
    for k, v in parse_key_values(args, " (for example: source=/data/train out=/data/prepared size=256)"):
        if k not in names:
            raise ValueError(f"unknown prepare key {k!r}; valid keys: {', '.join(names)}")
        kind = names[k].type if isinstance(names[k].type, str) else names[k].type.__name__
        try:
            values[k] = coerce_value(v, kind)
        except ValueError:
            raise ValueError(f"prepare key {k!r} expects a {kind}, got {v!r}") from None
    cfg = PrepareConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: PrepareConfig) -> None:
    if not cfg.source or not cfg.out:
        raise ValueError("prepare needs source=<images> and out=<folder to write>")
    for k, allowed in _CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"{k}={getattr(cfg, k)!r} is not one of {allowed}")
    for k in ("size", "batch_size", "shard_size"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k} must be at least 1, got {getattr(cfg, k)}")


# ---------------------------------------------------------------------------------------------
# ADM's crop
# ---------------------------------------------------------------------------------------------


def adm_center_crop(image, size: int) -> np.ndarray:
    """An RGB PIL image -> uint8 [size, size, 3] by ADM's rule: box-halve while the shorter side is at least
    2 * size (a cheap, alias-free downscale), bicubic-resize the shorter side to `size`, crop the centre."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    factor = size / min(image.size)
    image = image.resize(tuple(round(s * factor) for s in image.size), resample=Image.Resampling.BICUBIC)
    a = np.asarray(image)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def read_rgb(open_file):
    """A PIL image, fully decoded and in RGB, from `open_file()` (a path or a file object)."""
    from PIL import Image

    with Image.open(open_file) as im:
        im.load()                       # decode now: a truncated file fails here, not later
        return im.convert("RGB")        # L, LA, P, CMYK, RGBA -> RGB


# ---------------------------------------------------------------------------------------------
# Sources: N items, each an image to open, a label (-1: none) and a caption ("" : none)
# ---------------------------------------------------------------------------------------------


class ClassFolderSource:
    """ImageNet's layout: root/<class>/<image>; classes are the sorted subfolder names."""

    kind = "classes"

    def __init__(self, root):
        self.root = Path(root)
        self.class_names = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.files, self.labels, sizes = [], [], []
        for label, name in enumerate(self.class_names):
            entries = sorted((e for e in os.scandir(self.root / name)
                              if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_SUFFIXES), key=lambda e: e.name)
            self.files += [f"{name}/{e.name}" for e in entries]
            sizes += [e.stat().st_size for e in entries]
            self.labels += [label] * len(entries)
        if not self.files:
            raise FileNotFoundError(f"no images in the class subfolders of {str(self.root)!r} (expected "
                                    f"root/<class>/<image>{sorted(_IMAGE_SUFFIXES)})")
        listing = "".join(f"{f}:{s}\n" for f, s in zip(self.files, sizes))
        self.digest = hashlib.sha256(listing.encode()).hexdigest()
        self.captions = None

    def __len__(self):
        return len(self.files)

    def where(self, i):
        return str(self.root / self.files[i])

    def open(self, i):
        return read_rgb(self.root / self.files[i])

    def identity(self):
        return {"kind": self.kind, "root": str(self.root.resolve()), "n": len(self), "files": self.digest}


class CaptionFolderSource(ClassFolderSource):
    """A folder with captions.jsonl/csv (and an optional integer 'label' column)."""

    kind = "captions"

    def __init__(self, root):
        folder = CaptionedImageFolder(root, size=8)  # its checks: the caption file, its columns, every file exists
        self.root = Path(root)
        self.files = [str(Path(f).relative_to(self.root)) for f in folder.files]
        self.captions, self.labels = folder.captions, folder.labels
        has = [lab >= 0 for lab in self.labels]
        if any(has) and not all(has):
            raise ValueError(f"{folder.caption_file}: some rows have a label and some do not; give every row one "
                             f"or none")
        self.class_names = [str(k) for k in range(max(self.labels) + 1)] if all(has) else None
        self.digest = hashlib.sha256(Path(folder.caption_file).read_bytes()).hexdigest()


class HFSource:
    """A Hugging Face datasets dataset: a save_to_disk folder, imagefolder:<dir>, or hf:<hub name>."""

    kind = "datasets"

    def __init__(self, spec: str, split="train", image_column="", label_column="", caption_column="",
                 online=False):
        if spec.startswith("hf:") and not online:
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before datasets is first imported
        try:
            import datasets
        except ImportError:
            raise ImportError(f"source={spec!r} is a Hugging Face dataset, which needs the `datasets` package: "
                              f"pip install 'tld-course[prepare]'") from None
        self.spec, self.split = spec, split
        if spec.startswith(("hf:", "imagefolder:")):
            name, kw = (spec[3:], {}) if spec.startswith("hf:") else ("imagefolder", {"data_dir": spec[12:]})
            try:
                ds = datasets.load_dataset(name, split=split, **kw)
            except (OSError, ValueError, ConnectionError) as e:
                raise FileNotFoundError(f"source={spec!r} could not be loaded ({type(e).__name__}: {e}); a hub "
                                        f"name needs online=true or the datasets cache") from e
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{spec!r} has splits {list(ds)}, not split={split!r}")
                ds = ds[split]
        feats = ds.features
        images = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
        self.image_column = image_column or (images[0] if images else "")
        if self.image_column not in feats:
            raise ValueError(f"{spec!r}: no image column (features: {list(feats)}); pass image_column=")
        self.label_column = label_column or next((c for c in ("label", "labels") if c in feats), "")
        self.caption_column = caption_column or next((c for c in ("caption", "text", "prompt") if c in feats), "")
        for given, col in ((label_column, "label"), (caption_column, "caption")):
            if given and given not in feats:
                raise ValueError(f"{spec!r} has no {col} column {given!r}; features: {list(feats)}")
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # we decode: bad files are ours
        self.class_names = None
        self.labels = None
        if self.label_column:
            f = feats[self.label_column]
            self.labels = [int(v) for v in ds[self.label_column]]
            self.class_names = list(f.names) if isinstance(f, datasets.ClassLabel) else \
                [str(k) for k in range(max(self.labels) + 1)]
        self.captions = [str(v) for v in ds[self.caption_column]] if self.caption_column else None
        self.fingerprint = getattr(ds, "_fingerprint", "")

    def __len__(self):
        return len(self.ds)

    def where(self, i):
        return f"{self.spec}[{self.split}][{i}]"

    def open(self, i):
        v = self.ds[int(i)][self.image_column]
        return read_rgb(pyio.BytesIO(v["bytes"]) if v.get("bytes") else v["path"])

    def identity(self):
        return {"kind": self.kind, "spec": self.spec, "split": self.split, "n": len(self),
                "fingerprint": self.fingerprint, "image": self.image_column, "label": self.label_column,
                "caption": self.caption_column}


def open_source(cfg: PrepareConfig):
    spec = cfg.source
    hf = dict(split=cfg.split, image_column=cfg.image_column, label_column=cfg.label_column,
              caption_column=cfg.caption_column, online=cfg.online)
    if spec.startswith(("hf:", "imagefolder:")):
        return HFSource(spec, **hf)
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"source={spec!r} is not a folder (nor imagefolder:<dir> or hf:<name>)")
    if any((root / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return HFSource(spec, **hf)
    if any((root / f).is_file() for f in ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")):
        return CaptionFolderSource(root)
    return ClassFolderSource(root)


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def load_codec_spec(cfg: PrepareConfig, device):
    if cfg.codec in ("", "none"):
        return None
    p = Path(cfg.codec)
    if (p / "tld_codec.json").is_file() or ((p / "config.json").is_file()
                                           and io.read_json(p / "config.json").get("type") == "IdentityCodec"):
        return load_codec(p, device)
    return DiffusersVAE(cfg.codec, scale=cfg.scale, device=device, local_files_only=not cfg.online)


def load_text_spec(cfg: PrepareConfig, device):
    if cfg.text_encoder in ("", "none"):
        return None
    p = Path(cfg.text_encoder)
    if (p / "config.json").is_file() and io.read_json(p / "config.json").get("type") in ("TinyCLIP", "CLIPText"):
        return load_text_encoder(p, device)
    return CLIPText(cfg.text_encoder, device=device, projection=cfg.projection, local_files_only=not cfg.online)


def _spec_path(spec: str) -> str:
    """An encoder as the manifest records it: a folder as its absolute path (loadable from any working
    directory), a hub id as given."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def manifest_codec(manifest: dict, device="cpu"):
    """The codec that made a prepared folder's latents, loaded from what its manifest records (None: the
    folder holds pixels). FileNotFoundError naming it when it cannot be loaded here (a folder that moved, a
    hub id not in the cache); ValueError when the weights found differ from those that encoded the folder."""
    ident = manifest.get("codec")
    if ident is None:
        return None
    spec = manifest.get("codec_path") or ident.get("name") or ""
    try:
        codec = load_codec_spec(PrepareConfig(codec=spec, scale=ident.get("scale", 0.18215)), device)
    except (OSError, ValueError, ImportError) as e:
        raise FileNotFoundError(f"the prepared folder's codec {spec!r} (its manifest.json's codec_path) cannot be "
                                f"loaded here ({type(e).__name__}: {e}); put that folder back, or download the "
                                f"model into the Hugging Face cache") from e
    _same_weights(codec, ident, "codec", spec)
    return codec


def manifest_text_encoder(manifest: dict, device="cpu"):
    """The text encoder that made a prepared folder's embeddings (None: it has none), as manifest_codec."""
    ident = manifest.get("text_encoder")
    if ident is None:
        return None
    spec = manifest.get("text_encoder_path") or ident.get("name") or ""
    try:
        enc = load_text_spec(PrepareConfig(text_encoder=spec, projection=ident.get("projection", True)), device)
    except (OSError, ValueError, ImportError) as e:
        raise FileNotFoundError(f"the prepared folder's text encoder {spec!r} (its manifest.json's "
                                f"text_encoder_path) cannot be loaded here ({type(e).__name__}: {e})") from e
    _same_weights(enc, ident, "text encoder", spec)
    return enc


def manifest_encoders(manifest: dict, device="cpu") -> tuple:
    """(text encoder, codec, why not) for a text run's pipeline on a prepared folder: the encoders its
    manifest records, loaded (codec None for pixels), or (None, None or the codec, the reason in words)."""
    if manifest.get("text_encoder") is None:
        return None, None, "the prepared folder records no text encoder"
    try:
        return manifest_text_encoder(manifest, device), manifest_codec(manifest, device), ""
    except (FileNotFoundError, ValueError) as e:
        try:
            codec = manifest_codec(manifest, device)   # still decodes the samples, if it is here
        except (FileNotFoundError, ValueError):
            codec = None
        return None, codec, str(e)


def _same_weights(encoder, recorded: dict, what: str, spec: str) -> None:
    found = encoder_identity(encoder).get("weights")
    if recorded.get("weights") and found != recorded["weights"]:
        raise ValueError(f"the {what} at {spec!r} is not the one that made this prepared folder: its weights digest "
                         f"is {found[:16]}..., the manifest's {recorded['weights'][:16]}...")


def prepared_captions(folder) -> list[str]:
    """A captioned prepared folder's captions, one per source item (in the source's order)."""
    folder = Path(folder)
    m = PreparedDataset(folder).manifest
    if not m["captions"]:
        raise ValueError(f"the prepared folder {str(folder)!r} has no captions (prepared from "
                         f"{m['source']['kind']}); prepare a captioned source")
    rows = [c for s in m["shards"] if s["rows"] for c in io.read_json(folder / "shards" / s["name"] / "captions.json")]
    return rows[::m["views"]]


def iter_prepared_images(folder, batch: int = 250, n: int = 0, device="cpu"):
    """A prepared folder's images as uint8 [B, S, S, 3] batches (ADM's .npz layout): pixels (codec=none) as
    stored, latents decoded by the codec its manifest records. One view per source item (a flip=true
    folder's mirrors are left out); ``n`` > 0 takes n items spread evenly over the folder (its order is the
    source's, class by class for ImageNet). Returns (the batches' generator, the item count, a description)."""
    ds = PreparedDataset(folder)
    m = ds.manifest
    codec = manifest_codec(m, device)
    items = np.arange(0, m["count"], m["views"])
    if n and n < len(items):
        items = items[np.linspace(0, len(items) - 1, n).round().astype(np.int64)]
    what = f"{m['codec_path'] or m['codec'].get('name')} decoded" if codec is not None else "pixels"

    def batches():
        for lo in range(0, len(items), batch):
            z = torch.stack([ds[int(i)]["image"] for i in items[lo:lo + batch]])
            if codec is not None:
                with torch.no_grad():
                    z = codec.decode(z.to(device)).float().cpu()
            x = ((z.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            yield x.permute(0, 2, 3, 1).contiguous().numpy()
    return batches, len(items), f"{m['image_size']} px, {what}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# One shard: decode (in loader workers), encode in batches, write memory-mapped arrays
# ---------------------------------------------------------------------------------------------


class _Items(torch.utils.data.Dataset):
    """Source items lo..hi as {'i', 'image' uint8 [3, S, S] or None, 'error', 'upscaled'}; never raises."""

    def __init__(self, source, lo: int, hi: int, size: int, small: str):
        self.source, self.lo, self.hi, self.size, self.small = source, lo, hi, size, small

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, k):
        i = self.lo + k
        try:
            im = self.source.open(i)
        except Exception as e:  # noqa: BLE001 -- any decoder failure is "unreadable", reported with its path
            return {"i": i, "image": None, "error": f"{type(e).__name__}: {e}", "upscaled": False}
        upscaled = min(im.size) < self.size
        if upscaled and self.small == "skip":
            return {"i": i, "image": None, "error": f"smaller than size={self.size}: {im.size[0]}x{im.size[1]}",
                    "upscaled": False, "small": True}
        a = adm_center_crop(im, self.size)
        return {"i": i, "image": torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), "error": "",
                "upscaled": upscaled}


class _Writer:
    """Rows appended into preallocated .npy memmaps (at most `capacity` rows), trimmed on close."""

    def __init__(self, folder: Path, capacity: int):
        self.folder, self.capacity, self.rows, self.arrays = folder, capacity, 0, {}

    def add(self, out: dict):
        n = len(next(iter(out.values())))
        for k, v in out.items():
            if k not in self.arrays:
                self.arrays[k] = np.lib.format.open_memmap(self.folder / f"{k}.npy", mode="w+", dtype=v.dtype,
                                                           shape=(self.capacity, *v.shape[1:]))
            self.arrays[k][self.rows:self.rows + n] = v
        self.rows += n

    def close(self) -> dict:
        shapes = {}
        for k, a in self.arrays.items():
            a.flush()
            shapes[k] = {"shape": list(a.shape[1:]), "dtype": str(a.dtype)}
            if self.rows < self.capacity:  # items were skipped: rewrite at the true length
                final = np.lib.format.open_memmap(self.folder / f"{k}.tmp.npy", mode="w+", dtype=a.dtype,
                                                  shape=(self.rows, *a.shape[1:]))
                final[:] = a[:self.rows]
                final.flush()
                del final
                os.replace(self.folder / f"{k}.tmp.npy", self.folder / f"{k}.npy")
        self.arrays.clear()
        return shapes


@torch.no_grad()
def _encode(images: torch.Tensor, captions, labels, items, cfg: PrepareConfig, codec, text_encoder, device) -> dict:
    views = 2 if cfg.flip else 1
    x = images.to(device).float() / 127.5 - 1
    if cfg.flip:  # row 2i: the image, row 2i+1: its mirror
        x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
    dt = np.dtype(cfg.dtype)
    z = codec.encode(x) if codec is not None else x
    out = {"latents": z.float().cpu().numpy().astype(dt),
           "labels": np.repeat(np.asarray(labels, dtype=np.int64), views),
           "items": np.repeat(np.asarray(items, dtype=np.int64), views)}
    if text_encoder is not None:
        pooled, tokens, mask = text_encoder.encode(list(captions))
        if cfg.text in ("pooled", "both"):
            out["pooled"] = pooled.float().cpu().numpy().astype(dt).repeat(views, 0)
        if cfg.text in ("tokens", "both"):
            out["tokens"] = tokens.float().cpu().numpy().astype(dt).repeat(views, 0)
            out["mask"] = mask.cpu().numpy().astype(bool).repeat(views, 0)
    return out


def _collate(batch):
    return batch


def _write_shard(folder: Path, source, lo: int, hi: int, cfg: PrepareConfig, codec, text_encoder, device, key, bar):
    views = 2 if cfg.flip else 1
    loader = torch.utils.data.DataLoader(_Items(source, lo, hi, cfg.size, cfg.small), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, collate_fn=_collate)
    skipped, captions, upscaled = [], [], 0
    with io.atomic_folder(folder) as tmp:   # a shard is on disk whole, or not at all
        writer = _Writer(tmp, (hi - lo) * views)
        for batch in loader:
            good = []
            for b in batch:
                if b["image"] is not None:
                    good.append(b)
                    upscaled += b["upscaled"]
                    continue
                where = source.where(b["i"])
                if cfg.bad == "error" and not b.get("small"):
                    raise ValueError(f"cannot read image {where}: {b['error']} (bad=skip skips such images and "
                                     f"counts them)")
                tqdm.write(f"skipping {where}: {b['error']}", file=sys.stderr)
                skipped.append({"where": where, "error": b["error"]})
            if good:
                caps = [source.captions[b["i"]] for b in good] if source.captions is not None else [""] * len(good)
                labels = [source.labels[b["i"]] for b in good] if source.labels is not None else [-1] * len(good)
                writer.add(_encode(torch.stack([b["image"] for b in good]), caps, labels, [b["i"] for b in good],
                                   cfg, codec, text_encoder, device))
                captions += [c for c in caps for _ in range(views)]
            bar.update(len(batch))
        arrays = writer.close()
        if source.captions is not None:
            io.write_json(tmp / "captions.json", captions)
        io.write_json(tmp / "shard.json", {"key": key, "rows": writer.rows, "first_item": lo, "end_item": hi,
                                           "arrays": arrays, "skipped": skipped, "upscaled": upscaled})


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def _process() -> tuple[int, int, int]:
    """(rank, world, local rank) from accelerate launch's / torchrun's environment; (0, 1, 0) alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _shard_done(folder: Path, key: str) -> bool:
    meta = io.recover(folder) / "shard.json"
    return meta.is_file() and io.read_json(meta).get("key") == key


def prepare(cfg: PrepareConfig, poll_seconds: float = 1.0) -> Path:
    """Encode `cfg.source` into shards under `cfg.out` (this process's shards); process 0 then waits for
    every shard and writes the manifest, and the others wait for the manifest. Returns the finished folder.
    Safe to rerun: it resumes."""
    validate(cfg)
    rank, world, local = _process()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    source = open_source(cfg)
    n = min(len(source), cfg.limit) if cfg.limit else len(source)
    codec, text_encoder = load_codec_spec(cfg, device), load_text_spec(cfg, device)
    if text_encoder is not None and source.captions is None:
        raise ValueError(f"text_encoder={cfg.text_encoder!r} needs captions, but source={cfg.source!r} "
                         f"({source.kind}) has none; use text_encoder=none")
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("size", "flip", "small", "dtype", "text", "shard_size", "limit")}
    if text_encoder is None:
        settings.pop("text")
    ident = {"format": FORMAT, "version": VERSION, "source": source.identity(), "settings": settings,
             "codec": encoder_identity(codec), "text_encoder": encoder_identity(text_encoder)}
    ident = json.loads(json.dumps(ident, default=str))
    key = _digest(ident)
    if (out / "manifest.json").is_file():
        if io.read_json(out / "manifest.json").get("key") == key:
            if rank == 0 and cfg.progress:
                print(f"{out} is already prepared (manifest.json, key {key})")
            return out
        raise ValueError(f"out={str(out)!r} already holds another prepared dataset (its manifest has another key "
                         f"than this command's {key}); choose another out= or delete it")
    started = out / "prepare.json"
    if started.is_file() and io.read_json(started).get("key") != key:
        raise ValueError(f"out={str(out)!r} holds an unfinished prepare made with other settings, source or "
                         f"encoders (see {started}); rerun that command to finish it, or choose another out=")
    if rank == 0 and not started.is_file():
        out.mkdir(parents=True, exist_ok=True)
        io.write_json(started, {"key": key, **ident, "command": asdict(cfg)})
    shards = [(k, k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size)) for k in range(math.ceil(n / cfg.shard_size))]
    folder = lambda k: out / "shards" / f"{k:05d}"
    todo = [s for s in shards if s[0] % world == rank and not _shard_done(folder(s[0]), key)]
    bar = tqdm(total=sum(hi - lo for _, lo, hi in todo), desc=f"prepare [{rank}/{world}]", unit="img",
               position=rank, disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for k, lo, hi in todo:
        _write_shard(folder(k), source, lo, hi, cfg, codec, text_encoder, device, key, bar)
    bar.close()
    if rank != 0:  # wait for process 0's manifest, so that every process returns a finished folder
        while not (out / "manifest.json").is_file():
            time.sleep(poll_seconds)
        return out
    # process 0 writes the manifest once every process's shards are on disk (the filesystem is the
    # barrier: no collective to time out while a slower GPU finishes its last shard)
    last_report = time.perf_counter()
    while missing := [k for k, _, _ in shards if not _shard_done(folder(k), key)]:
        if time.perf_counter() - last_report > 60:
            print(f"waiting for {len(missing)} shard(s) of other processes: {missing[:8]}", file=sys.stderr)
            last_report = time.perf_counter()
        time.sleep(poll_seconds)
    write_manifest(out, key, ident, shards, source, codec, text_encoder, cfg)
    if cfg.progress:
        m = io.read_json(out / "manifest.json")
        print(f"prepared {m['count']} rows from {m['items']} images ({m['skipped']} skipped, {m['upscaled']} "
              f"upscaled) into {out} in {time.perf_counter() - t0:.1f} s")
    return out


def write_manifest(out: Path, key: str, ident: dict, shards, source, codec, text_encoder, cfg) -> None:
    metas = [io.read_json(out / "shards" / f"{k:05d}" / "shard.json") for k, _, _ in shards]
    arrays = next((m["arrays"] for m in metas if m["rows"]), None)
    if arrays is None:
        raise ValueError(f"every image of source={cfg.source!r} was skipped; nothing to train on")
    skipped = [s for m in metas for s in m["skipped"]]
    rows, first = [], 0
    for (k, lo, hi), m in zip(shards, metas):
        rows.append({"name": f"{k:05d}", "rows": m["rows"], "first_row": first, "items": [lo, hi]})
        first += m["rows"]
    views = 2 if cfg.flip else 1
    labels = source.class_names is not None
    manifest = {
        "format": FORMAT, "version": VERSION, "key": key, "count": first, "items": first // views, "views": views,
        "arrays": arrays, "image_size": cfg.size,
        "latent_shape": arrays["latents"]["shape"], "dtype": arrays["latents"]["dtype"],
        "labels": labels, "class_names": source.class_names, "num_classes": len(source.class_names) if labels else 0,
        "captions": source.captions is not None, "text": [k for k in ("pooled", "tokens") if k in arrays],
        "codec": ident["codec"], "text_encoder": ident["text_encoder"],
        "digests": {"codec": _digest(ident["codec"]) if codec is not None else None,
                    "text_encoder": _digest(ident["text_encoder"]) if text_encoder is not None else None},
        "codec_path": _spec_path(cfg.codec) if codec is not None else None,
        "text_encoder_path": _spec_path(cfg.text_encoder) if text_encoder is not None else None,
        "source": ident["source"], "settings": ident["settings"],
        "skipped": len(skipped), "skipped_examples": skipped[:100],
        "upscaled": sum(m["upscaled"] for m in metas), "shards": rows,
    }
    if source.kind == "classes":
        io.write_json(out / "classes.json", {name: i for i, name in enumerate(source.class_names)})
    io.write_json(out / "manifest.json", manifest)   # last: its presence means the folder is whole


# ---------------------------------------------------------------------------------------------
# Reading: the trainer's dataset=prepared
# ---------------------------------------------------------------------------------------------


class _Rows:
    """One shard's .npy file, read a row at a time with positional reads (os.pread): only the bytes of
    the rows asked for are read, and none of the file is mapped into the process."""

    def __init__(self, path: Path):
        header = np.load(path, mmap_mode="r")   # only for its header: offset, dtype, shape (no page is read)
        if not header.flags.c_contiguous:
            raise ValueError(f"{path}: a Fortran-ordered array; prepared shards are C-ordered")
        self.path, self.dtype, self.shape, self.offset = path, header.dtype, header.shape, header.offset
        del header
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __len__(self):
        return self.shape[0]

    def row(self, r: int) -> np.ndarray:
        at = self.offset + r * self.row_bytes
        if hasattr(os, "pread"):
            data = os.pread(self.fd, self.row_bytes, at)
        else:  # Windows: no pread; one reader per process, so seek + read is safe
            os.lseek(self.fd, at, os.SEEK_SET)
            data = os.read(self.fd, self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class PreparedDataset(torch.utils.data.Dataset):
    """A prepared folder, streamed: ds[i] = {'image': latent float32, 'label'?, 'text'?}.

    Nothing is read up front but the manifest. Each shard's arrays are opened on first use, in the process
    that uses it (each loader worker opens its own), and an item reads exactly its row's bytes, so a rank
    reading its slice of each batch touches only those rows. Positional reads, not np.memmap: on a Linux
    with large page-cache folios, faulting in one 48 KB row of a mapped shard mapped 0.5-1.7 MB, and a
    training process's resident memory grew toward the folder's size within an epoch (measured; see
    the README). `conditioning` picks what items carry: class -> 'label', text -> 'text' (the pooled
    embedding, or with text="tokens" the token sequence and its 'mask').
    """

    def __init__(self, folder, conditioning: str = "none", text: str = "pooled"):
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        if self.folder.is_file():
            raise ValueError(f"data_root={str(self.folder)!r} is a file; dataset=prepared reads a folder made by python "
                             f"-m tld.prepare (dataset=tensors reads one small .safetensors file)")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"the prepared folder {str(self.folder)!r} does not exist. Real data is not shipped "
                                    f"with tld: make it once with python -m tld.prepare source=<images> "
                                    f"out={self.folder} (python -m tld.train --help shows each GPU preset's command)")
        if not mpath.is_file():
            hint = (" (prepare.json is there: the prepare did not finish; rerun the same python -m tld.prepare "
                    "command to resume it)") if (self.folder / "prepare.json").is_file() else \
                " (make one with python -m tld.prepare source=... out=...)"
            raise FileNotFoundError(f"{str(self.folder)!r} is not a prepared folder: no manifest.json{hint}")
        self.manifest = m = io.read_json(mpath)
        if m.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a tld prepared manifest (format {m.get('format')!r})")
        self.conditioning, self.text_key = conditioning, text
        self.names = [s["name"] for s in m["shards"]]
        self.first = np.asarray([s["first_row"] for s in m["shards"]], dtype=np.int64)
        self.num_classes = m["num_classes"] if conditioning == "class" else 0
        self.class_names = m["class_names"]
        self.keys = ["latents"] + (["labels"] if conditioning == "class" else []) + \
            ([text] + (["mask"] if text == "tokens" else []) if conditioning == "text" else [])
        self._open = {}

    def __len__(self) -> int:
        return self.manifest["count"]

    def _rows(self, shard: int, key: str) -> _Rows:
        a = self._open.get((shard, key))
        if a is None:
            a = self._open[(shard, key)] = _Rows(self.folder / "shards" / self.names[shard] / f"{key}.npy")
        return a

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a prepared folder of {len(self)} rows")
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        r = i - int(self.first[s])
        row = lambda key: self._rows(s, key).row(r)
        item = {"image": torch.from_numpy(row("latents").astype(np.float32))}
        if self.conditioning == "class":
            item["label"] = int(row("labels"))
        elif self.conditioning == "text":
            item["text"] = torch.from_numpy(row(self.text_key).astype(np.float32))
            if self.text_key == "tokens":
                item["mask"] = torch.from_numpy(row("mask").copy())
        return item

    def __getstate__(self):  # loader workers open their own maps
        return {**self.__dict__, "_open": {}}


def open_prepared(folder, conditioning: str, image_size: int, text: str = "pooled") -> PreparedDataset:
    """The trainer's dataset=prepared: a PreparedDataset, checked against the run (conditioning, size)."""
    ds = PreparedDataset(folder, conditioning, text)
    m, where = ds.manifest, str(ds.folder)
    made = f"(prepared from {m['source']['kind']} {m['source'].get('root') or m['source'].get('spec')!s})"
    if conditioning == "class" and not m["labels"]:
        raise ValueError(f"conditioning=class needs labels, but the prepared folder {where!r} has none {made}; "
                         f"use conditioning=text{' (it has text embeddings)' if m['text'] else ''} or "
                         f"conditioning=none, or prepare a class-subfolder source")
    if conditioning == "text" and text not in m["text"]:
        other = "pooled" if text == "tokens" else "tokens"
        switch = {"pooled": "text_tokens=false (the pooled vector as one token)",
                  "tokens": "text_tokens=true (a U-ViT reading the token sequence)"}[other]
        instead = f"use {switch}, or " if other in m["text"] else ""
        raise ValueError(f"conditioning=text{' text_tokens=true' if text == 'tokens' else ''} needs {text!r} text "
                         f"embeddings, but the prepared folder {where!r} has {m['text'] or 'none'} {made}; {instead}"
                         f"prepare it with text_encoder=... text={text if other not in m['text'] else 'both'}, or use "
                         f"conditioning={'class' if m['labels'] else 'none'}")
    shape = m["latent_shape"]
    if shape[-1] != image_size or shape[-2] != image_size:
        raise ValueError(f"image_size={image_size}, but the prepared folder {where!r} holds {'x'.join(map(str, shape))} "
                         f"{'latents' if m['codec'] else 'pixels'} (from {m['image_size']} px images); set "
                         f"image_size={shape[-1]} or prepare with another size=")
    return ds


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        print("keys:", ", ".join(f"{f.name}={f.default!r}" for f in fields(PrepareConfig)))
        return 0
    try:
        prepare(config_from_args(argv))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
