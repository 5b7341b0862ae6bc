"""Latent codecs behind one interface (lesson 10).

    z = codec.encode(images)     # images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w]
    x = codec.decode(z)          # back to [B, 3, H, W] in [-1, 1]
    codec.scale                  # the factor that gives latents unit variance

Latent diffusion (Rombach et al. 2022, Sec. 3) runs the denoiser on z = scale * E(x), not on x:
fewer positions to attend over, and the autoencoder, not the diffusion model, spends its effort
on imperceptible detail. `scale` makes z have roughly unit standard deviation, which the noise
schedules assume (Stable Diffusion's VAE: 0.18215, from 1/std of its latents; LDM Sec. G).

* ``DiffusersVAE(name_or_path, scale=0.18215)``: a diffusers ``AutoencoderKL`` (for example
  ``stabilityai/sd-vae-ft-ema``), from disk only, checked.
* ``train_vae()``: a small ``AutoencoderKL`` trained here on shapes, the offline path.
* ``finetune_decoder(codec)``: sharpen a codec's decoder on its frozen encoder's latents; every denoiser
  trained on those latents keeps working with the new decoder.
* ``IdentityCodec``: pixel space, so the same code trains and samples without an autoencoder.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .cli import coerce_value, parse_key_values
from .data import ShapesDataset
from .geometry import geometric_accuracy
from .optim import fit_one_cycle

__all__ = ["IdentityCodec", "DiffusersVAE", "tiny_vae_config", "train_vae", "finetune_decoder", "latent_scale",
           "psnr", "reconstruction_reads", "load_codec", "main"]


class IdentityCodec(nn.Module):
    """Pixel space: encode and decode are the identity, scale 1."""

    scale = 1.0
    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        with io.atomic_folder(folder) as tmp:
            io.write_json(tmp / "config.json", {"type": "IdentityCodec", "channels": self.latent_channels})
        return folder


class DiffusersVAE(nn.Module):
    """A diffusers AutoencoderKL as a codec. `vae`: a name, a folder, or an AutoencoderKL object.

    encode returns scale * (the posterior mean): deterministic, so a cache of latents is
    reproducible (pass `sample=True` for a draw from the posterior, as LDM trains with).
    """

    def __init__(self, vae, scale: float = 0.18215, device="cpu", local_files_only: bool = True):
        super().__init__()
        from diffusers import AutoencoderKL

        if isinstance(vae, (str, os.PathLike)):
            name = str(vae)
            if os.path.isdir(name):
                has_weights = any(os.path.isfile(os.path.join(name, w))
                                  for w in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
                missing = [] if os.path.isfile(os.path.join(name, "config.json")) else ["config.json"]
                missing += [] if has_weights else ["diffusion_pytorch_model.safetensors"]
                if missing:
                    raise FileNotFoundError(f"AutoencoderKL folder {name!r} lacks {', '.join(missing)}")
            try:
                vae, info = AutoencoderKL.from_pretrained(name, local_files_only=local_files_only,
                                                          output_loading_info=True)
            except OSError as e:
                raise FileNotFoundError(f"AutoencoderKL {name!r} is not on disk ({e.__class__.__name__}); download "
                                        f"it once with `huggingface-cli download {name}` or pass a folder") from e
            if info["missing_keys"]:
                raise ValueError(f"AutoencoderKL weights from {name!r} lack {info['missing_keys'][:5]}")
            self.name = name
        else:
            self.name = None
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"expected a diffusers AutoencoderKL, a name or a folder, got {type(vae).__name__}")
        self.vae = vae.to(device).eval()
        self.scale = float(scale)
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"expected images [B, {self.vae.config.in_channels}, H, W] in [-1, 1], "
                             f"got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the VAE's "
                             f"downsampling factor {self.downsample}")
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / self.scale).sample

    def save_pretrained(self, folder) -> Path:
        """The AutoencoderKL (config.json + diffusion_pytorch_model.safetensors) and tld_codec.json (scale)."""
        folder = Path(folder)
        with io.atomic_folder(folder) as tmp:
            self.vae.save_pretrained(str(tmp))
            io.write_json(tmp / "tld_codec.json", {"type": "DiffusersVAE", "scale": self.scale})
        return folder


def load_codec(folder, device="cpu"):
    """Whatever a codec's `save_pretrained` wrote into `folder`."""
    folder = io.recover(Path(folder))
    if (folder / "tld_codec.json").is_file():
        return DiffusersVAE(folder, io.read_json(folder / "tld_codec.json")["scale"], device)
    cfg = folder / "config.json"
    if cfg.is_file() and io.read_json(cfg).get("type") == "IdentityCodec":
        return IdentityCodec(io.read_json(cfg)["channels"])
    raise FileNotFoundError(f"no tld codec in {str(folder)!r}: expected tld_codec.json (a VAE) or an "
                            "IdentityCodec config.json")


# --------------------------------------------------------------------------- a small VAE, trained here

def tiny_vae_config(latent_channels: int = 4, widths=(8, 16, 16)) -> dict:
    """A small AutoencoderKL: len(widths) - 1 halvings (32 px -> 8 px for three widths), no mid attention."""
    n = len(widths)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=list(widths),
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                layers_per_block=1, norm_num_groups=min(8, widths[0]), sample_size=32, mid_block_add_attention=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()


@torch.no_grad()
def latent_scale(codec_or_vae, images: torch.Tensor) -> float:
    """1 / std of the unscaled latents of `images`: the factor that gives the diffusion unit variance."""
    codec = codec_or_vae if isinstance(codec_or_vae, DiffusersVAE) else DiffusersVAE(codec_or_vae, 1.0)
    return 1.0 / (codec.encode(images) / codec.scale).std().item()


def _pixel_loss(recon: torch.Tensor, x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """L1 + MSE with the shape's pixels weighted ``1 + fg_weight``: shapes cover ~5 % of a shapes image, and
    unweighted, a short run learns a grey blob on the background."""
    w = 1 + fg_weight * (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True).clamp(max=0.2) / 0.2
    err = recon - x
    return (w * (err.abs() + err.pow(2))).mean() / w.mean()


def train_vae(steps: int = 200, batch_size: int = 16, lr: float = 5e-3, kl_weight: float = 1e-6, fg_weight: float = 10.0,
              image_size: int = 32, seed: int = 0, progress: bool = False, **config) -> DiffusersVAE:
    """Train a small AutoencoderKL on shapes (seeds 30_000 + seed) and return it as a DiffusersVAE.

    Loss: L1 + MSE on pixels (shape pixels weighted `1 + fg_weight`) plus a tiny KL to N(0, I) (LDM's KL-reg, Rombach et al. 2022 Sec. 3,
    without its perceptual and GAN terms). Its scale is set from the latents: 1 / std.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(**config))
    # start from a nearly deterministic posterior (std ~ 0.05 instead of ~1): with the KL weight this
    # small, the variance only ever shrinks, and a short run should be spent on reconstruction, not noise
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] *= 0.1
        vae.quant_conv.bias[c:] = -6.0
    ds = ShapesDataset(size=image_size, seed=30_000 + seed, length=10_000_000)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step):
        x = ds.batch(torch.randint(len(ds), (batch_size,), generator=gen).tolist())["image"]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(gen)).sample
        return _pixel_loss(recon, x, fg_weight) + kl_weight * dist.kl().mean()

    fit_one_cycle(vae, loss_at, steps, lr, weight_decay=0.0, progress=progress)
    probe = ShapesDataset(size=image_size, seed=30_000 + seed, length=256).batch(range(256))["image"]
    return DiffusersVAE(vae, scale=latent_scale(vae, probe))


def finetune_decoder(codec: DiffusersVAE, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3,
                     fg_weight: float = 10.0, image_size: int = 32, seed: int = 0,
                     progress: bool = False) -> DiffusersVAE:
    """A copy of ``codec`` whose decoder is trained on, with its encoder frozen: sharper reconstructions of the
    *same* latents.

    The encoder, its ``quant_conv`` and ``scale`` are left exactly as they were, so the latents of every image
    are unchanged, and a denoiser trained on them needs no retraining: only the decoder (``post_quant_conv``
    and ``decoder``) learns, on the posterior means (what ``encode`` and the training cache use) of fresh
    shapes (seeds 40_000 + seed, unseen by ``train_vae``), with ``train_vae``'s weighted L1 + MSE. Stable
    Diffusion's ``sd-vae-ft-mse`` was made the same way, a decoder-only fine-tune that kept its latents, so
    existing models kept working (Stability AI, 2022). ``codec`` itself is not modified.
    """
    if not isinstance(codec, DiffusersVAE):
        raise TypeError(f"finetune_decoder needs a DiffusersVAE (a decoder to train), got {type(codec).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    vae = copy.deepcopy(codec.vae).float()   # trained in float32 on the codec's device
    device = vae.device
    vae.requires_grad_(False)
    decoder = nn.ModuleList([m for m in (vae.post_quant_conv, vae.decoder) if m is not None]).requires_grad_(True)
    ds = ShapesDataset(size=image_size, seed=40_000 + seed, length=10_000_000)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step):
        x = ds.batch(torch.randint(len(ds), (batch_size,), generator=gen).tolist())["image"].to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        return _pixel_loss(vae.decode(z).sample, x, fg_weight)

    fit_one_cycle(decoder, loss_at, steps, lr, weight_decay=0.0, progress=progress)
    vae.requires_grad_(False)
    return DiffusersVAE(vae.eval(), scale=codec.scale, device=device)


@torch.no_grad()
def reconstruction_reads(codec, n: int = 300, size: int = 32, seed: int = 0) -> dict:
    """``tld.geometry``'s reading of a codec's reconstructions ``decode(encode(x))`` of ``n`` perfect renders
    (held-out seed 7 + seed, all nine positions): a latent model's samples are no crisper than its decoder draws
    a perfect latent. A lossless codec reads strict 1; the renders themselves read IoU ~0.99."""
    batch = ShapesDataset(size=size, seed=7 + seed, length=n).batch(range(n))
    recon = torch.cat([codec.decode(codec.encode(batch["image"][i:i + 100])).float().clamp(-1, 1).cpu()
                       for i in range(0, n, 100)])
    return geometric_accuracy(recon, batch["shape"])


USAGE = ("usage: python -m tld.autoencoder finetune-decoder SRC OUT [steps=3000] [lr=1e-3] [batch_size=32] "
         "[seed=0] [threads=0]\n  SRC: a codec folder (tld_codec.json); OUT: where the fine-tuned codec goes")


def main(argv: list[str] | None = None) -> int:
    """``finetune-decoder SRC OUT [key=value ...]``: ``finetune_decoder`` on a saved codec, its reconstructions
    read before and after (``reconstruction_reads``), saved atomically to OUT."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["finetune-decoder"] or len(argv) < 3:
        print(USAGE, file=sys.stderr)
        return 2
    src, out, opts = argv[1], Path(argv[2]), {}
    kinds = {"steps": "int", "lr": "float", "batch_size": "int", "seed": "int", "threads": "int"}
    try:
        for key, value in parse_key_values(argv[3:], hint=f"\n{USAGE}"):
            if key not in kinds:
                raise ValueError(f"expected one of {', '.join(k + '=' for k in kinds)}, got {key}={value!r}\n{USAGE}")
            try:
                opts[key] = coerce_value(value, kinds[key])
            except ValueError:
                raise ValueError(f"{key} must be {kinds[key]}, got {value!r}") from None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = opts.pop("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        codec = load_codec(src)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = reconstruction_reads(codec)
    t0 = time.perf_counter()
    tuned = finetune_decoder(codec, progress=True, **opts)
    seconds = time.perf_counter() - t0
    after = reconstruction_reads(tuned)
    tuned.save_pretrained(out)
    for name, r in (("before", before), ("after", after)):
        print(f"{name}: reconstructions of 300 renders: strict {r['strict']:.3f}, IoU {r['iou']:.3f}")
    print(f"fine-tuned the decoder in {seconds:.0f} s; saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
