"""Text-to-image in one object (lesson 10): text encoder + denoiser + codec + schedule + sampler.

    pipe = TextToImage.from_pretrained("data/pretrained/shapes-t2i")
    images = pipe(["a red circle at the top left"], steps=20, guidance=3.0, seed=0)   # [B, 3, H, W] in [0, 1]

The denoiser is any tld model conditioned on text. ``condition="pooled"`` (TLD's cross-attention
context, DiT's adaLN) calls ``model(x, t, pooled [B, D])``, for example
``tld.models.create("tld-course", num_classes=0, text_dim=64, in_chans=4, img_size=8)``;
``condition="tokens"`` (U-ViT's extra tokens) calls ``model(x, t, tokens [B, L, D])``, for example
``create("uvit-course", num_classes=0, text_dim=64, text_len=16, ...)``.
Guidance contrasts the prompt with the null prompt (``null="empty"``: the encoding of "",
``"zero"``: the zero vector, TLD's choice); train with the same null in the condition dropout.

One folder holds it all: ``pipeline.json`` (schedule, sampler, null, the denoiser's preset and
arguments), ``denoiser.safetensors``, ``text_encoder/`` and ``codec/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .autoencoder import load_codec
from .diffusion import get_schedule
from .models import create
from .samplers import sample
from .text import load_text_encoder, null_embedding

__all__ = ["TextToImage"]


class TextToImage(nn.Module):
    def __init__(self, denoiser: nn.Module, text_encoder, codec, *, denoiser_config: dict,
                 schedule: str = "rectified", prediction: str = "x0", sampler: str = "dpm++2m",
                 null: str = "empty", guidance: float = 3.0, condition: str = "pooled"):
        super().__init__()
        if "name" not in denoiser_config:
            raise ValueError("denoiser_config must hold the preset 'name' (and its overrides) so the pipeline "
                             "can rebuild the denoiser, e.g. {'name': 'tld-course', 'num_classes': 0, ...}")
        if condition not in ("pooled", "tokens"):
            raise ValueError(f"condition must be 'pooled' or 'tokens', got {condition!r}")
        width = text_encoder.dim if condition == "pooled" else text_encoder.encode([""])[1].shape[-1]
        text_dim = getattr(denoiser, "text_dim", None)
        if text_dim is not None and text_dim != width:
            raise ValueError(f"the denoiser takes {condition} text of width {text_dim} but the text encoder gives "
                             f"{width}; build the denoiser with text_dim={width}")
        if denoiser.in_chans != codec.latent_channels:
            raise ValueError(f"the denoiser takes {denoiser.in_chans} channels but the codec's latents have "
                             f"{codec.latent_channels}")
        self.denoiser, self.text_encoder, self.codec = denoiser.eval(), text_encoder, codec
        self.config = dict(denoiser=dict(denoiser_config), schedule=schedule, prediction=prediction,
                           sampler=sampler, null=null, guidance=guidance, condition=condition)
        self.schedule = get_schedule(schedule)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts, steps: int = 20, guidance: float | None = None, seed: int = 0,
                 output: str = "pt", sampler: str | None = None, progress: bool = False):
        """Images [B, 3, H, W] in [0, 1] (output='pt') or a list of PIL images (output='pil')."""
        if output not in ("pt", "pil"):
            raise ValueError(f"output must be 'pt' or 'pil', got {output!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        guidance = self.config["guidance"] if guidance is None else float(guidance)
        cond, null = self.condition(prompts)
        d = self.denoiser
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), d.in_chans, d.img_size, d.img_size, generator=g).to(self.device)
        z = sample(d, noise, self.schedule, sampler=sampler or self.config["sampler"], steps=steps,
                   prediction=self.config["prediction"], cond=cond,
                   null_cond=null if guidance != 1.0 else None, guidance=guidance, generator=g, progress=progress)
        images = ((self.codec.decode(z).float().clamp(-1, 1) + 1) / 2).cpu()
        if output == "pt":
            return images
        from PIL import Image

        arr = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def condition(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, null cond) as the denoiser reads them: pooled [B, D] or tokens [B, L, D]."""
        n = len(prompts)
        if self.config["condition"] == "pooled":
            cond = self.text_encoder.encode(prompts)[0]
            null = null_embedding(self.text_encoder, n, self.config["null"])
        else:
            cond = self.text_encoder.encode(prompts)[1]
            empty = self.text_encoder.encode([""])[1].expand(n, -1, -1)
            null = empty if self.config["null"] == "empty" else torch.zeros_like(empty)
        return cond.to(self.device), null.to(self.device)

    # -- one folder
    def save_pretrained(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()}
        save_file(state, str(folder / "denoiser.safetensors.tmp"))
        os.replace(folder / "denoiser.safetensors.tmp", folder / "denoiser.safetensors")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.codec.save_pretrained(folder / "codec")
        (folder / "pipeline.json").write_text(json.dumps({"type": "TextToImage", **self.config}, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> TextToImage:
        from safetensors.torch import load_file

        folder = Path(folder)
        needed = ["pipeline.json", "denoiser.safetensors", "text_encoder", "codec"]
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r} is not a saved TextToImage pipeline: missing {', '.join(missing)}")
        config = json.loads((folder / "pipeline.json").read_text())
        if config.pop("type", None) != "TextToImage":
            raise ValueError(f"{folder / 'pipeline.json'} does not describe a TextToImage pipeline")
        denoiser_config = config.pop("denoiser")
        spec = dict(denoiser_config)
        denoiser = create(spec.pop("name"), **spec)
        state = load_file(str(folder / "denoiser.safetensors"))
        missing_k, unexpected = denoiser.load_state_dict(state, strict=False)
        if missing_k or unexpected:
            raise ValueError(f"{folder / 'denoiser.safetensors'} does not fit the denoiser in pipeline.json: "
                             f"missing {missing_k[:5]}, unexpected {unexpected[:5]}")
        return cls(denoiser.to(device), load_text_encoder(folder / "text_encoder", device),
                   load_codec(folder / "codec", device), denoiser_config=denoiser_config, **config)
