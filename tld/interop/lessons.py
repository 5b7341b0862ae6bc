"""The lessons' last cell: sample from a family's released weights, or say exactly what is missing.

``official_sample_or_explain(name)`` samples a few images from an official checkpoint with the
course's own sampler (``tld.samplers.sample``) when a GPU and the files are present, and otherwise
prints which file to download from where and returns None, in well under a second (nothing heavy
is imported before the checks pass). Files are looked for in ``$TLD_OFFICIAL_DIR``
(default ``~/.cache/tld/official``) unless ``path`` is given; the VAEs and CLIP come from the local
Hugging Face cache (``huggingface_hub.snapshot_download`` puts them there); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..samplers import sample
from ..viz import image_grid
from .official import OFFICIAL, load_official

SD_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of DiT, U-DiT and U-ViT's ImageNet models
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"  # TLD's
CLIP_L14 = "openai/clip-vit-large-patch14"  # TLD's text encoder (pooled, projected: clip's encode_text)
IMAGENET = [207, 360, 387, 974, 88, 979, 417, 279]  # golden retriever, otter, red panda, geyser, macaw, ...
PROMPTS = ["a cute grey great owl", "a lake in mountains in the fall at sunset", "painting of a cyberpunk market",
           "watercolor of a cute cat riding a motorcycle"]  # prompts of the TLD README's examples

# name -> how to sample it: schedule, prediction, the network's time and outputs, the codec, the condition
RECIPES = {
    "cifar10_uvit_small": dict(schedule="vp-linear", prediction="eps", time_scale=0.999, steps=50, guidance=1.0),
    "DiT-XL-2-256x256": dict(schedule="vp-linear", prediction="eps", channels=4, steps=25, guidance=4.0,
                             vae=SD_VAE, latent_scale=0.18215, classes=IMAGENET),
    "U-DiT-L-1000k": dict(schedule="vp-linear", prediction="eps", channels=4, steps=25, guidance=4.0,
                          vae=SD_VAE, latent_scale=0.18215, classes=IMAGENET),
    "state_dict_378000": dict(schedule="rectified", prediction="x0", steps=20, guidance=6.0, vae=SDXL_VAE,
                              latent_scale=1 / 8, text=CLIP_L14, prompts=PROMPTS),
}


def official_dir() -> Path:
    return Path(os.environ.get("TLD_OFFICIAL_DIR", Path.home() / ".cache" / "tld" / "official")).expanduser()


def _skip(name: str, why: str, todo: str) -> None:
    print(f"skipping the official {name} cell: {why}. {todo}")


def _hub_model(cls, repo: str, **kw):
    """A model from the local Hugging Face cache only, or None when it is not there."""
    try:
        return cls.from_pretrained(repo, local_files_only=True, **kw)
    except (OSError, ValueError):
        return None


def _clip_text_encoder(device):
    from transformers import CLIPModel, CLIPTokenizer

    tok, clip = _hub_model(CLIPTokenizer, CLIP_L14), _hub_model(CLIPModel, CLIP_L14)
    if tok is None or clip is None:
        return None
    clip = clip.to(device).eval()

    @torch.no_grad()
    def encode(prompts):
        batch = tok(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = clip.get_text_features(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return encode


def official_sample_or_explain(name: str, *, path=None, device=None, n: int | None = None, steps: int | None = None,
                               seed: int = 0, model=None, vae=None, text_encoder=None, require_gpu: bool = True,
                               show: bool = False):
    """Images [n, 3, H, W] in [0, 1] (on the CPU) sampled from the official ``name``, or None after printing why not.

    ``name`` is one of ``RECIPES`` (lesson 04: ``cifar10_uvit_small``, 05: ``DiT-XL-2-256x256``,
    10: ``state_dict_378000``, 11: ``U-DiT-L-1000k``). It skips, saying which file to get from where,
    when there is no GPU (``require_gpu``), when the checkpoint is not at ``path`` (default
    ``official_dir() / filename``), or when its VAE / text encoder is not in the local Hugging Face
    cache. ``model``, ``vae`` (a diffusers ``AutoencoderKL``) and ``text_encoder`` (prompts -> [B, 768])
    replace the files when given; ``show`` also draws the images in one row (matplotlib). Times and labels follow ``tld.interop.official``: class models
    guide against label 1000, TLD against the zero text vector.
    """
    if name not in RECIPES:
        raise ValueError(f"no sampling recipe for {name!r}; expected one of {', '.join(RECIPES)}")
    spec, r = OFFICIAL[name], RECIPES[name]
    path = Path(path) if path is not None else official_dir() / spec.filename
    todo = (f"To run it, download {spec.filename} from {spec.source} to {path} (or pass path=..., or set "
            f"TLD_OFFICIAL_DIR)" + (f", and {r['vae']} with huggingface_hub.snapshot_download" if r.get("vae") else "")
            + (f" and {r['text']}" if r.get("text") else "") + ", on a machine with a GPU")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if require_gpu and (device.type != "cuda" or not torch.cuda.is_available()):
        return _skip(name, "no GPU here (sampling it takes a GPU)", todo)
    if model is None and not path.is_file():
        return _skip(name, f"no file at {path}", todo)
    if r.get("vae") and vae is None:
        from diffusers import AutoencoderKL

        vae = _hub_model(AutoencoderKL, r["vae"])
        if vae is None:
            return _skip(name, f"the VAE {r['vae']} is not in the local Hugging Face cache", todo)
    if r.get("text") and text_encoder is None:
        text_encoder = _clip_text_encoder(device)
        if text_encoder is None:
            return _skip(name, f"the text encoder {r['text']} is not in the local Hugging Face cache", todo)

    net = (model if model is not None else load_official(path, spec.family, name, device=device)).to(device).eval()
    dtype = next(net.parameters()).dtype
    if r.get("classes"):
        cond = torch.tensor(r["classes"], device=device)[:n]
        null = torch.full_like(cond, 1000)
    elif r.get("prompts"):
        cond = text_encoder(r["prompts"][:n]).to(device=device, dtype=dtype)
        null = torch.zeros_like(cond)
    else:
        cond = null = None
    count = len(cond) if cond is not None else (n or 8)

    def fn(x, t, y):  # the network's own conventions around the tld model
        out = net(x, t * r.get("time_scale", 1.0), y)
        return out[:, : r["channels"]] if r.get("channels") else out

    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(count, net.in_chans, net.img_size, net.img_size, generator=gen, device=device, dtype=dtype)
    with torch.no_grad():
        x = sample(fn, noise, r["schedule"], sampler="dpm++2m", steps=steps or r["steps"], prediction=r["prediction"],
                   cond=cond, null_cond=null, guidance=r["guidance"] if cond is not None else 1.0, progress=False)
        if r.get("vae"):  # latents -> images
            vae = vae.to(device).eval()
            x = vae.decode((x / r["latent_scale"]).to(next(vae.parameters()).dtype)).sample
    images = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    if show:
        import matplotlib.pyplot as plt

        plt.figure(figsize=(1.6 * len(images), 2))
        plt.imshow(image_grid(images, nrow=len(images)))
        plt.title(f"{spec.filename}, {steps or r['steps']} DPM-Solver++ steps", fontsize=9)
        plt.axis("off")
        plt.show()
    return images
