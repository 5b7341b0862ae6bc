"""Text-to-image in one object (lesson 10): text encoder + denoiser + codec + schedule + sampler.

    pipe = TextToImage.from_pretrained(tld.assets.path("shapes-t2i"))
    images = pipe(["a red circle at the top left"], steps=20, guidance=3.0, seed=0)   # [B, 3, H, W] in [0, 1]

The denoiser is any tld model conditioned on text. ``condition="pooled"`` (TLD's cross-attention
context, DiT's adaLN) calls ``model(x, t, pooled [B, D])``, for example
``tld.models.create("tld-course", num_classes=0, text_dim=64, in_chans=4, img_size=8)``;
``condition="tokens"`` (U-ViT's extra tokens) calls ``model(x, t, tokens [B, L, D])``, for example
``create("uvit-course", num_classes=0, text_dim=64, text_len=16, ...)``.
Guidance contrasts the prompt with the null prompt (``null="empty"``: the encoding of "",
``"zero"``: the zero vector, TLD's choice); train with the same null in the condition dropout.

One folder holds it all: ``pipeline.json`` (schedule, sampler, null, the denoiser's preset and
arguments), ``denoiser.safetensors``, ``text_encoder/`` and ``codec/``. (The top file is
``pipeline.json``, not ``config.json``, so a pipeline folder is told from a model folder at a glance,
as diffusers' ``model_index.json`` does.) A save builds the whole folder beside the old one and swaps
it in (``tld.io``): a failed save never pairs a new denoiser with old encoders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from . import assets, io
from .autoencoder import IdentityCodec, load_codec
from .diffusion import get_schedule
from .judge import held_out_captions, shapes_adherence
from .models import create
from .runs import encoder_folder, latest_checkpoint, load_model
from .samplers import check_interval, generate
from .text import load_text_encoder, null_embedding
from .viz import image_grid

__all__ = ["TextToImage", "held_out_captions", "measure_adherence", "adherence_over_training", "main"]


class TextToImage(nn.Module):
    def __init__(self, denoiser: nn.Module, text_encoder, codec, *, denoiser_config: dict,
                 schedule: str = "rectified", prediction: str = "x0", sampler: str = "dpm++2m",
                 null: str = "empty", guidance: float = 3.0, condition: str = "pooled",
                 guidance_interval: tuple[float, float] | None = None):
        super().__init__()
        if "name" not in denoiser_config:
            raise ValueError("denoiser_config must hold the preset 'name' (and its overrides) so the pipeline "
                             "can rebuild the denoiser, e.g. {'name': 'tld-course', 'num_classes': 0, ...}")
        if condition not in ("pooled", "tokens"):
            raise ValueError(f"condition must be 'pooled' or 'tokens', got {condition!r}")
        if null not in ("empty", "zero"):
            raise ValueError(f"null must be 'empty' (the empty prompt's encoding) or 'zero', got {null!r}")
        width = text_encoder.dim if condition == "pooled" else text_encoder.encode([""])[1].shape[-1]
        text_dim = getattr(denoiser, "text_dim", None)
        if text_dim is not None and text_dim != width:
            raise ValueError(f"the denoiser takes {condition} text of width {text_dim} but the text encoder gives "
                             f"{width}; build the denoiser with text_dim={width}")
        if denoiser.in_chans != codec.latent_channels:
            raise ValueError(f"the denoiser takes {denoiser.in_chans} channels but the codec's latents have "
                             f"{codec.latent_channels}")
        self.denoiser, self.text_encoder, self.codec = denoiser.eval(), text_encoder, codec
        guidance_interval = check_interval(guidance_interval)
        if guidance_interval is not None:
            guidance_interval = list(guidance_interval)
        self.config = dict(denoiser=dict(denoiser_config), schedule=schedule, prediction=prediction,
                           sampler=sampler, null=null, guidance=guidance, condition=condition)
        if guidance_interval is not None:   # guide only for t in [lo, hi] (Kynkäänniemi et al. 2024)
            self.config["guidance_interval"] = guidance_interval
        self.schedule = get_schedule(schedule)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts, steps: int = 20, guidance: float | None = None, seed: int = 0,
                 output: str = "pt", sampler: str | None = None, progress: bool = False,
                 guidance_interval: tuple[float, float] | None | str = "config"):
        """Images [B, 3, H, W] in [0, 1] (output='pt') or a list of PIL images (output='pil').

        ``guidance_interval=(lo, hi)`` guides only for t in [lo, hi] (one unguided call per step elsewhere);
        ``None`` guides at every step; by default the pipeline's own (``config["guidance_interval"]``, if any).
        """
        if output not in ("pt", "pil"):
            raise ValueError(f"output must be 'pt' or 'pil', got {output!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        guidance = self.config["guidance"] if guidance is None else float(guidance)
        interval = self.config.get("guidance_interval") if isinstance(guidance_interval, str) else guidance_interval
        if isinstance(guidance_interval, str) and guidance_interval != "config":
            raise ValueError(f"guidance_interval must be (lo, hi), None or 'config', got {guidance_interval!r}")
        cond, null = self.condition(prompts)
        z = generate(self.denoiser, self.schedule, prediction=self.config["prediction"], cond=cond, null_cond=null,
                     steps=steps, sampler=sampler or self.config["sampler"], guidance=guidance, seed=seed,
                     clamp=False, progress=progress, guidance_interval=interval)
        images = ((self.codec.decode(z).float().clamp(-1, 1) + 1) / 2).cpu()
        if output == "pt":
            return images
        from PIL import Image

        arr = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        return [Image.fromarray(a) for a in arr]

    @torch.no_grad()
    def condition(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, null cond) as the denoiser reads them: pooled [B, D] or tokens [B, L, D].

        ``null="zero"`` is the denoiser's own null condition (what training's dropout put in its
        place); ``null="empty"`` is the encoding of the empty prompt, for encoders trained that way.
        """
        pooled, tokens, _ = self.text_encoder.encode(prompts)
        cond = pooled if self.config["condition"] == "pooled" else tokens
        if self.config["null"] == "zero":
            null = self.denoiser.null_condition(cond)
        elif self.config["condition"] == "pooled":
            null = null_embedding(self.text_encoder, len(prompts), "empty")
        else:
            null = self.text_encoder.encode([""])[1].expand(len(prompts), -1, -1)
        return cond.to(self.device), null.to(self.device)

    # -- one folder
    def save_pretrained(self, folder) -> Path:
        """Write the pipeline folder; the previous one stays loadable until the new one is complete."""
        folder = Path(folder)
        with io.atomic_folder(folder) as tmp:
            io.save_tensors(tmp / "denoiser.safetensors", self.denoiser.state_dict())
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.codec.save_pretrained(tmp / "codec")
            io.write_json(tmp / "pipeline.json", {"type": "TextToImage", **self.config})
        return folder

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> TextToImage:
        folder = io.recover(Path(folder))
        needed = ["pipeline.json", "denoiser.safetensors", "text_encoder", "codec"]
        missing = [f for f in needed if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r} is not a saved TextToImage pipeline: missing {', '.join(missing)}")
        config = io.read_json(folder / "pipeline.json")
        if config.pop("type", None) != "TextToImage":
            raise ValueError(f"{folder / 'pipeline.json'} does not describe a TextToImage pipeline")
        denoiser_config = config.pop("denoiser")
        spec = dict(denoiser_config)
        denoiser = create(spec.pop("name"), **spec)
        io.load_exact(denoiser, io.load_tensors(folder / "denoiser.safetensors"), folder / "denoiser.safetensors",
                      "the denoiser in pipeline.json")
        return cls(denoiser.to(device), load_text_encoder(folder / "text_encoder", device),
                   load_codec(folder / "codec", device), denoiser_config=denoiser_config, **config)

    @classmethod
    def for_training_run(cls, denoiser: nn.Module, text_encoder, codec, train_config: dict,
                         model_kwargs: dict) -> TextToImage:
        """The pipeline a `python -m tld.train conditioning=text` run defines: its schedule, prediction and
        sampler, guidance against the zero vector (its dropout null), the pooled caption (the token sequence
        with text_tokens); pixels if no codec."""
        tc = train_config
        return cls(denoiser, text_encoder, codec if codec is not None else IdentityCodec(denoiser.in_chans),
                   denoiser_config={"name": tc["model"], **model_kwargs}, schedule=tc["schedule"],
                   prediction=tc["prediction"], sampler=tc["sample_sampler"], null="zero",
                   guidance=tc["sample_guidance"], condition="tokens" if tc.get("text_tokens") else "pooled",
                   guidance_interval=tc.get("sample_guidance_interval") or None)   # "lo,hi": __init__ checks it

    @classmethod
    def from_run(cls, run_dir, step: int | None = None, which: str = "ema", device="cpu") -> TextToImage:
        """The pipeline of a `python -m tld.train conditioning=text ...` run at one of its checkpoints.

        ``step=None`` takes the latest; ``which`` is "ema" (what samples should come from) or "model".
        """
        run_dir = Path(run_dir)
        if which not in ("ema", "model"):
            raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a training run (no config.json)")
        tc = json.loads((run_dir / "config.json").read_text())["train_config"]
        encoder = encoder_folder(tc.get("text_encoder", ""), run_dir, "text_encoder")
        if tc.get("conditioning") != "text" or encoder is None or not encoder.is_dir():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a text-conditioned training run with its text "
                                    f"encoder (conditioning={tc.get('conditioning')!r}, text_encoder="
                                    f"{tc.get('text_encoder')!r})")
        ckpt = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / f"step_{step:07d}"
        if ckpt is None or not ckpt.is_dir():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
            raise FileNotFoundError(f"no checkpoint {'yet' if step is None else f'for step {step}'} in {run_dir}; "
                                    f"found {have or 'none'}")
        denoiser = load_model(ckpt, which, device)
        codec_dir = encoder_folder(tc.get("codec", ""), run_dir, "codec")
        return cls.for_training_run(denoiser, load_text_encoder(encoder, device),
                                    load_codec(codec_dir, device) if codec_dir is not None else None,
                                    tc, denoiser.model_kwargs)


@torch.no_grad()
def measure_adherence(pipe: TextToImage, n: int = 256, steps: int = 20, guidance: float | None = None,
                      batch: int = 64) -> dict:
    """shapes_adherence of `pipe` on n held-out captions (color, shape, position, all three)."""
    captions = held_out_captions(n, size=pipe.denoiser.img_size * getattr(pipe.codec, "downsample", 1))
    images = torch.cat([pipe(captions[i:i + batch], steps=steps, guidance=guidance, seed=i)
                        for i in range(0, n, batch)])
    return {k: float(v) for k, v in shapes_adherence(images, captions).items()}


def adherence_over_training(run_dir, n: int = 256, steps: int = 20, guidance: float | None = None,
                            progress: bool = True) -> list[dict]:
    """Adherence of every saved checkpoint of a text run, with the training minutes it took to reach it."""
    run_dir = Path(run_dir)
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()] if (run_dir / "log.jsonl").is_file() else []
    seconds = {r["step"]: r["seconds"] for r in log}
    rows = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        pipe = TextToImage.from_run(run_dir, step)
        row = {"step": step, "minutes": round(seconds[step] / 60, 1) if step in seconds else None,
               **{k: round(v, 3) for k, v in measure_adherence(pipe, n, steps, guidance).items()}}
        rows.append(row)
        if progress:
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    """python -m tld.pipeline PATH "a prompt" ... [--out grid.png]   |   python -m tld.pipeline PATH --adherence"""
    p = argparse.ArgumentParser(prog="python -m tld.pipeline",
                                description="Generate from a TextToImage folder (or a text training run), or "
                                            "measure its prompt adherence on held-out shapes captions.")
    p.add_argument("path", help="a pipeline folder (pipeline.json), a text-conditioned training run, or a "
                                "shipped pipeline's name (shapes-t2i)")
    p.add_argument("prompts", nargs="*", help="prompts to draw")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="where the grid of prompts goes")
    p.add_argument("--adherence", action="store_true", help="score n held-out captions (every checkpoint of a run)")
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args(argv)
    path = assets.resolve(args.path)
    is_pipeline = (path / "pipeline.json").is_file()
    if args.adherence:
        if is_pipeline:
            print(json.dumps(measure_adherence(TextToImage.from_pretrained(path), args.n, args.steps, args.guidance)))
        else:
            rows = adherence_over_training(path, args.n, args.steps, args.guidance)
            (path / "adherence.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if not args.prompts:
        p.error("give one or more prompts, or --adherence")
    pipe = TextToImage.from_pretrained(path) if is_pipeline else TextToImage.from_run(path)
    images = pipe(args.prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
    image_grid(images, nrow=min(len(images), 8), scale=4).save(args.out)
    print(f"{len(images)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
