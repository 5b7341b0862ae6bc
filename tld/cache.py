"""Precomputed latents and text embeddings (lesson 10).

The autoencoder and the text encoder are frozen while the denoiser trains, so encoding every
image and caption once, up front, saves their cost on every epoch (TLD and fast-DiT both do
this). The cache is a folder of ``.npy`` files read memory-mapped, so a cache larger than RAM
still trains.

The folder's name is a hash of *what made it*: each encoder's class, config and a digest of its
weights, plus the dataset's identity and length. Retrain the VAE, change its scale, or swap the
text encoder, and the key changes: a stale cache is never read.

    folder = build_cache(ShapesDataset(32), "~/.cache/tld/latents", codec=vae, text_encoder=clip, n=20_000)
    ds = CachedDataset(folder)          # ds[i] = {'image': latent, 'pooled', 'caption', 'label'}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import io

__all__ = ["weights_digest", "encoder_identity", "dataset_identity", "cache_key", "build_cache", "CachedDataset"]


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes in `module.state_dict()`."""
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _jsonable(d) -> dict:
    return json.loads(json.dumps(dict(d), default=str, sort_keys=True))


def encoder_identity(encoder) -> dict | None:
    """What identifies an encoder's outputs: class, config (scale, tokenizer...) and weights digest."""
    if encoder is None:
        return None
    ident = {"class": type(encoder).__name__}
    for attr in ("scale", "name", "projection", "max_length"):
        if hasattr(encoder, attr) and not callable(getattr(encoder, attr)):
            ident[attr] = getattr(encoder, attr)
    if hasattr(encoder, "vae"):                      # DiffusersVAE
        ident["config"] = _jsonable(encoder.vae.config)
    elif hasattr(encoder, "config"):                 # TinyCLIP
        ident["config"] = _jsonable(encoder.config)
    if hasattr(encoder, "tokenizer") and hasattr(encoder.tokenizer, "to_str"):
        ident["tokenizer"] = hashlib.sha256(encoder.tokenizer.to_str().encode()).hexdigest()
    if isinstance(encoder, torch.nn.Module) and any(True for _ in encoder.parameters()):
        ident["weights"] = weights_digest(encoder)
    if hasattr(encoder, "latent_channels"):
        ident["channels"] = encoder.latent_channels
    return ident


def dataset_identity(dataset, n: int) -> dict:
    """The dataset's class and its simple settings (size, seed, palette, ...), and how many items."""
    ident = {"class": type(dataset).__name__, "n": int(n)}
    for k, v in sorted(vars(dataset).items()):
        if k == "length":   # item i depends on (settings, i), not on the length
            continue
        if isinstance(v, (int, float, str, bool, tuple, list)):
            ident[k] = v if not isinstance(v, (tuple, list)) else [str(x) for x in v]
        elif isinstance(v, np.ndarray):   # e.g. the background color, kept as a private array
            ident[k] = hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]
    if hasattr(dataset, "root"):
        ident["root"] = str(dataset.root)
    return ident


def cache_key(dataset, n: int, codec=None, text_encoder=None, tokens: bool = False) -> str:
    ident = {"dataset": dataset_identity(dataset, n), "codec": encoder_identity(codec),
             "text_encoder": encoder_identity(text_encoder), "tokens": bool(tokens), "format": 1}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _batch(dataset, idx: list) -> dict:
    if hasattr(dataset, "batch"):
        return dataset.batch(idx)
    items = [dataset[i] for i in idx]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "label": torch.tensor([it["label"] for it in items])}


@torch.no_grad()
def build_cache(dataset, root, codec=None, text_encoder=None, n: int | None = None, batch_size: int = 64,
                tokens: bool = False, progress: bool = False) -> Path:
    """Encode the first `n` items once into root/<key>/ and return that folder (reused when present).

    Writes latents.npy [N, C, h, w] (codec.encode, already scaled; raw images without a codec),
    pooled.npy [N, D] (with a text encoder), tokens.npy + mask.npy (if `tokens`), labels.npy,
    captions.json and, last, meta.json: a folder without meta.json is unfinished and rebuilt.
    """
    n = len(dataset) if n is None else int(n)
    if n < 1 or n > len(dataset):
        raise ValueError(f"n={n} items requested from a dataset of {len(dataset)}")
    key = cache_key(dataset, n, codec, text_encoder, tokens)
    folder = Path(os.path.expanduser(str(root))) / key
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_folder(folder) as tmp:   # an unfinished earlier attempt is replaced, never read
        labels, captions = _encode_into(tmp, dataset, n, codec, text_encoder, tokens, batch_size, progress)
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        io.write_json(tmp / "captions.json", captions)
        meta = {"key": key, "n": n, "dataset": dataset_identity(dataset, n), "codec": encoder_identity(codec),
                "text_encoder": encoder_identity(text_encoder), "tokens": tokens}
        io.write_json(tmp / "meta.json", json.loads(json.dumps(meta, default=str)))
    return folder


def _encode_into(tmp: Path, dataset, n: int, codec, text_encoder, tokens: bool, batch_size: int, progress: bool):
    """Encode batch by batch into preallocated memory-mapped .npy files; returns (labels, captions)."""
    arrays, captions, labels = {}, [], []
    for start in range(0, n, batch_size):
        b = _batch(dataset, list(range(start, min(n, start + batch_size))))
        out = {"latents": codec.encode(b["image"]) if codec is not None else b["image"]}
        if text_encoder is not None:
            pooled, tok, mask = text_encoder.encode(b["caption"])
            out["pooled"] = pooled
            if tokens:
                out["tokens"], out["mask"] = tok, mask
        for k, v in out.items():
            arr = v.detach().float().cpu().numpy() if k != "mask" else v.cpu().numpy()
            if k not in arrays:   # preallocate on disk, written batch by batch
                arrays[k] = np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=arr.dtype,
                                                      shape=(n, *arr.shape[1:]))
            arrays[k][start:start + len(arr)] = arr
        captions += list(b["caption"])
        labels += [int(v) for v in b["label"]]
        if progress:
            print(f"cached {start + len(b['caption'])}/{n}")
    for a in arrays.values():
        a.flush()
    return labels, captions


class CachedDataset(Dataset):
    """Items from a `build_cache` folder, memory-mapped: {'image': latent, 'pooled'?, 'tokens'?, 'mask'?,
    'caption', 'label'}. 'image' holds the latent so the trainer treats it like any dataset."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"{str(self.folder)!r} is not a finished tld cache (meta.json is missing)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.arrays = {k: np.load(self.folder / f"{k}.npy", mmap_mode="r")
                       for k in ("latents", "pooled", "tokens", "mask") if (self.folder / f"{k}.npy").is_file()}
        self.labels = np.load(self.folder / "labels.npy")
        self.captions = json.loads((self.folder / "captions.json").read_text())

    def __len__(self) -> int:
        return self.meta["n"]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} items")
        item = {("image" if k == "latents" else k): torch.from_numpy(np.array(a[i])) for k, a in self.arrays.items()}
        item["caption"], item["label"] = self.captions[i], int(self.labels[i])
        return item
