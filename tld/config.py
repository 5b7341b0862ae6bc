"""Training configuration: ``TrainConfig``, the presets, the GPU recipes and validation; it re-exports the one
``key=value`` parser every command line here uses (``tld.cli``: ``tld.train``, ``tld.evaluate``, ``tld.demo``, ...).

    cfg = config_from_args(["preset=smoke", "max_steps=50", "model.depth=4"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from . import diffusion
from .cli import coerce_value, parse_key_values, parse_literal
from .models import PRESETS as MODEL_PRESETS
from .optim import LR_SCHEDULES, lr_at
from .samplers import GUIDANCE_INTERVAL, check_interval, interval_string

COURSE_INTERVAL = interval_string(GUIDANCE_INTERVAL)   # "0.3,1": how the cpu presets guide their sample grids

__all__ = ["TrainConfig", "PRESETS", "GPU_RECIPES", "DATASETS", "CONDITIONINGS", "config_from_args", "validate",
           "parse_key_values", "coerce_value", "parse_literal", "learning_rate"]

DATASETS = ("shapes", "digits", "folder", "tensors", "prepared")
CONDITIONINGS = ("class", "none", "text")

@dataclass
class TrainConfig:
    # model: a preset of tld.models, with constructor overrides (CLI: model.depth=8)
    model: str = "uvit-course"
    model_overrides: dict = field(default_factory=dict)
    # data
    dataset: str = "shapes"  # shapes | digits | folder | prepared | tensors
    # dataset=folder: a folder of images with captions.jsonl/csv (and a 'label' column for conditioning=class);
    # dataset=prepared: a folder made by python -m tld.prepare (.npy shards, streamed row by row);
    # dataset=tensors: one small .safetensors file, loaded whole, with "images" [N, C, H, W] (pixels in
    # [-1, 1] or scaled latents) and "labels" [N] or "text" [N, D]
    data_root: str = ""
    image_size: int = 32
    dataset_length: int = 1_000_000  # procedural datasets: how many distinct images
    # dataset=shapes: only these of the nine positions, comma-separated (e.g. "center"); "": all of them
    shapes_positions: str = ""
    conditioning: str = "class"  # class | none | text (pooled text: a tensors file's, or text_encoder's)
    # conditioning=text on captioned data (shapes, folder): the text encoder is "tinyclip" (trained here
    # first, saved in out_dir/text_encoder) or a saved encoder's folder. On images (any conditioning) the
    # codec is "" (pixels), "tiny-vae" (trained here first, saved in out_dir/codec) or a saved codec's
    # folder. Both run once over the first cache_items items into cache_dir (default out_dir/cache), which
    # training then reads; a text run ends by saving a TextToImage pipeline in out_dir/pipeline, and a class
    # run's latents are decoded by tld.runs.codec_folder(run) (tld.demo export copies it into the model).
    text_encoder: str = ""
    codec: str = ""
    cache_dir: str = ""
    cache_items: int = 20_000
    encoder_steps: int = 300  # TinyCLIP training steps (text_encoder=tinyclip)
    vae_steps: int = 800  # small VAE training steps (codec=tiny-vae)
    # then this many decoder-only steps on its frozen encoder's latents (tld.autoencoder.finetune_decoder; 0: none)
    vae_decoder_steps: int = 0
    # conditioning=text: U-ViT reads the text encoder's token sequence [L, D] (CLIP: 77 x 768), as U-ViT's
    # MS-COCO model does, instead of the pooled vector as one token (needs a U-ViT model)
    text_tokens: bool = False
    class_dropout: float = 0.1  # classifier-free guidance: labels replaced by the null class
    # diffusion
    schedule: str = "vp-cosine"
    # eps | x0 | v | edm (EDM's preconditioning: x0_hat = c_skip x_t + c_out F with sigma_data 0.5,
    # tld.diffusion.edm_coefficients; with loss_weighting=none its loss is EDM's)
    prediction: str = "v"
    time_sampler: str = "uniform"
    # train only on times t <= t_max_train (0: the schedule's own t_max): a low-noise expert, as eDiff-I's
    # expert denoisers and SDXL's refiner are trained on part of the noise range
    t_max_train: float = 0.0
    # none | min-snr (min(SNR, gamma) times the implied x0's squared error) | edm (Karras et al. 2022's
    # lambda(sigma): 1 + sigma_data^2 SNR times the implied x0's squared error) | x0 (weight 1 on the implied
    # x0's squared error: x0 prediction's weighting, e.g. on a v-predicting network)
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    edm_sigma_data: float = 0.5
    # a model that predicts its variance too (2C output channels: DiT's learn_sigma) trains on
    # L_simple + vlb_weight * T * L_vlb (Nichol & Dhariwal 2021's hybrid objective, lambda = 0.001)
    vlb_weight: float = 0.001
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
    # besides log.jsonl: accelerate's trackers, e.g. tensorboard (needs tensorboard), wandb, or "tensorboard,wandb"
    log_with: str = ""
    sample_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    sample_steps: int = 50
    sample_sampler: str = "ddim"
    sample_guidance: float = 1.0
    # guide the sample grids only for t in "lo,hi" (e.g. "0.3,1", as make demo does); "": at every step
    sample_guidance_interval: str = ""
    seed: int = 0
    resume: bool = False
    # start from the weights of this model folder (an exported model, a checkpoint or a run folder): the
    # model and its EMA begin there, with a fresh optimizer at step 0 (fine-tuning, or training on further)
    init_from: str = ""
    progress: bool = True


PRESETS: dict[str, dict] = {
    # seconds on a CPU: the tests' and papermill's preset
    "smoke": dict(model="uvit-tiny", image_size=16, batch_size=16, max_steps=20, warmup_steps=5,
                  log_every=5, sample_steps=5, out_dir="runs/smoke"),
    # the course's CPU model (make demo): see tld/assets/shapes-cond-uvit/README.md
    # x0 prediction learns the shapes far sooner than v on this budget (measured at equal steps, shape
    # accuracy of samples at step 750: x0 0.54, v 0.37; see tld/assets/shapes-cond-uvit/README.md)
    "cpu-demo": dict(model="uvit-course", image_size=32, batch_size=64, max_steps=1000, max_minutes=10,
                     warmup_steps=50, lr=2e-3, prediction="x0", sample_guidance=3.0,
                     sample_guidance_interval=COURSE_INTERVAL, out_dir="runs/demo", save_every=200),
    # the shipped class-conditional model (tld/assets/shapes-cond): latent diffusion. The TLD denoiser (patch 2,
    # the label embedding its cross-attention context) on the 16x16x4 latents of shapes-t2i's VAE, whose
    # decoder reconstructs renders at render precision; the recipe of cpu-demo otherwise. 4,000 steps, ~32 min
    # on two threads. (The pixel U-DiT it replaces trained 119 min to strict 0.74; see its README.)
    "shapes-cond": dict(model="tld-course", model_overrides={"patch_size": 2}, codec="shapes-t2i/codec",
                        cache_items=20_000, image_size=32, batch_size=64, max_steps=4000, max_minutes=100,
                        warmup_steps=50, lr=2e-3, prediction="x0", sample_guidance=3.0,
                        sample_guidance_interval=COURSE_INTERVAL, sample_sampler="dpm++2m", sample_steps=20,
                        save_every=500, keep_checkpoints=20, out_dir="runs/shapes-cond"),
    # make demo: shapes-cond's recipe in ten minutes (its cosine decay planned over 1,200 steps)
    "cpu-demo-latent": dict(model="tld-course", model_overrides={"patch_size": 2}, codec="shapes-t2i/codec",
                            cache_items=10_000, image_size=32, batch_size=64, max_steps=1200, max_minutes=10,
                            warmup_steps=50, lr=2e-3, prediction="x0", sample_guidance=3.0,
                            sample_guidance_interval=COURSE_INTERVAL, sample_sampler="dpm++2m", sample_steps=20,
                            save_every=200, out_dir="runs/demo"),
    # lesson 12's CPU run: a minute for recognisable shapes. The course U-ViT shrunk to 16 px, x0 prediction
    # under Min-SNR-5 weighting, shapes in the center only (python -m tld.bench quality base=cpu-lesson compares
    # the choices; at 1,000 steps, seeds 0-2, Min-SNR-5 lifted the geometric shape read from 0.58-0.72 to 0.92-0.97)
    "cpu-lesson": dict(model="uvit-course", model_overrides={"patch_size": 4, "embed_dim": 64, "depth": 4,
                                                             "conv_mlp": False},
                       image_size=16, shapes_positions="center", prediction="x0", loss_weighting="min-snr",
                       min_snr_gamma=5.0, batch_size=32, max_steps=1000,
                       warmup_steps=20, lr=2e-3, ema_decay=0.99, log_every=50, sample_steps=20,
                       sample_guidance=3.0, sample_guidance_interval=COURSE_INTERVAL, out_dir="runs/cpu-lesson"),
    # the course's text-to-image model (tld/assets/shapes-t2i): the TLD denoiser cross-attending to
    # TinyCLIP's pooled caption, on 16x16x4 latents of a small VAE (PSNR 44 dB on shapes); the recipe of
    # cpu-demo otherwise. Trains its encoders first (~10 min: the VAE's decoder is then sharpened for 3,000 steps
    # on its frozen encoder's latents), then ~45 min on one CPU thread. (U-ViT with
    # the pooled caption as one token learned color but not position: position 0.17 at step 2000, where
    # this model is at 1.00 by step 750; see tld/assets/shapes-t2i/README.md)
    "shapes-t2i": dict(model="tld-course", model_overrides={"patch_size": 2}, dataset="shapes", image_size=32,
                       conditioning="text", text_encoder="tinyclip", codec="tiny-vae", vae_decoder_steps=3000,
                       cache_items=20_000,
                       batch_size=64, max_steps=3000, warmup_steps=50, lr=2e-3, prediction="x0",
                       class_dropout=0.1, sample_guidance=3.0, sample_guidance_interval=COURSE_INTERVAL, sample_steps=20,
                       sample_sampler="dpm++2m", save_every=250, keep_checkpoints=20, out_dir="runs/shapes-t2i"),
}

# GPU recipes: the papers' optimiser, lr, weight decay, betas, EMA, warmup and batch (REFERENCES.md "Recipes").
# They stream a ``dataset=prepared`` folder that is NOT shipped (CIFAR-10 pixels, ImageNet / text-image latents,
# made once by python -m tld.prepare: see GPU_RECIPES below); on a machine without it they stop with a
# FileNotFoundError.
PRESETS.update({
    # U-ViT S/2 on CIFAR-10 (Bao et al. 2023, Table 7 / configs/cifar10_uvit_small.py): unconditional, eps, VP.
    "uvit-s2-cifar10": dict(model="uvit-s/2", dataset="prepared", data_root="data/cifar10-32",
                            image_size=32, conditioning="none", schedule="vp-linear", prediction="eps",
                            batch_size=128, lr=2e-4, weight_decay=0.03, beta1=0.99, beta2=0.999,
                            warmup_steps=2500, lr_schedule="constant", ema_decay=0.9999, max_steps=500_000,
                            mixed_precision="bf16", log_every=100, save_every=10_000, sample_every=10_000,
                            sample_sampler="dpm++2m", sample_steps=50, out_dir="runs/uvit-s2-cifar10"),
    # DiT-XL/2 on ImageNet-256 SD-VAE latents x 0.18215 (Peebles & Xie 2023): AdamW 1e-4, wd 0, constant lr,
    # no warmup, EMA 0.9999, batch 256, label dropout 0.1; eps and a learned sigma (8 output channels) trained
    # on L_simple + 0.001 L_vlb, sampled with DDPM and that variance (250 steps, as DiT's FID samples).
    "dit-xl2-imagenet": dict(model="dit-xl/2", vlb_weight=0.001, dataset="prepared",
                             data_root="data/imagenet256-sdvae", image_size=32,
                             conditioning="class", class_dropout=0.1, schedule="vp-linear", prediction="eps",
                             batch_size=256, lr=1e-4, weight_decay=0.0, beta1=0.9, beta2=0.999, warmup_steps=0,
                             lr_schedule="constant", grad_clip=0.0, ema_decay=0.9999, max_steps=400_000,
                             mixed_precision="bf16", log_every=100, save_every=20_000, sample_every=20_000,
                             sample_sampler="ddpm", sample_steps=250, sample_guidance=4.0,
                             out_dir="runs/dit-xl2-imagenet"),
    # U-ViT-S/2 (Deep) text-to-image on MS-COCO 256 (Bao et al. 2023, Table 4, FID 5.48; configs/mscoco_uvit.py
    # with depth 16, 17 blocks): SD-VAE latents 4x32x32, the 77 CLIP ViT-L/14 tokens (768) as 77 extra tokens,
    # AdamW 2e-4, wd 0.03, betas (0.9, 0.9), 5K warmup then constant, batch 256, 1M steps, EMA 0.9999, 10% of
    # captions dropped; sampled with DPM-Solver 50 steps at guidance w = 2 (U-ViT's scale 1 is w - 1).
    # Differences: our vp-linear betas (1e-4..0.02), not SD's scaled-linear (0.00085..0.012)^2, and the
    # latent scale is whatever the prepared latents carry (U-ViT's COCO features use 0.23010).
    "uvit-t2i": dict(model="uvit-s/2", model_overrides={"depth": 16}, dataset="prepared",
                     data_root="data/mscoco256-sdvae-clip", image_size=32, conditioning="text",
                     text_tokens=True, class_dropout=0.1, schedule="vp-linear", prediction="eps",
                     batch_size=256, lr=2e-4, weight_decay=0.03, beta1=0.9, beta2=0.9, warmup_steps=5000,
                     lr_schedule="constant", ema_decay=0.9999, max_steps=1_000_000, mixed_precision="bf16",
                     log_every=100, save_every=50_000, sample_every=10_000, sample_sampler="dpm++2m",
                     sample_steps=50, sample_guidance=2.0, out_dir="runs/uvit-t2i"),
    # TLD 100M, 256px text-to-image (apapiu/transformer_latent_diffusion): SDXL-VAE latents / 8 (4x32x32),
    # pooled CLIP (768), x0 target, rectified schedule, sigma ~ Beta(1, 2.5), Adam 3e-4, EMA 0.999, batch 256,
    # text dropped to the zero vector 15% of the time.
    "tld-256": dict(model="tld-100m", dataset="prepared", data_root="data/text256-sdxlvae-clip",
                    image_size=32, conditioning="text", class_dropout=0.15, schedule="rectified", prediction="x0",
                    time_sampler="beta", batch_size=256, lr=3e-4, weight_decay=0.0, beta1=0.9, beta2=0.999,
                    warmup_steps=0, lr_schedule="constant", ema_decay=0.999, max_steps=260_000,
                    mixed_precision="bf16", log_every=100, save_every=10_000, sample_every=10_000,
                    sample_sampler="dpm++2m", sample_steps=20, sample_guidance=4.0, out_dir="runs/tld-256"),
})

GPU_RECIPES = """\
GPU presets. Expected time on one A100-80GB in bf16, estimated from the training FLOPs per image
(torch.utils.flop_counter, forward + backward) at 40% of the 312 TFLOP/s bf16 peak:

  preset            model     data (a dataset=prepared folder)               batch  steps  GFLOP/img  ~1 A100
  uvit-s2-cifar10   uvit-s/2  CIFAR-10 train, pixels in [-1, 1], 3x32x32      128   500K     73     ~11 h
  dit-xl2-imagenet  dit-xl/2  ImageNet-256 SD-VAE latents x 0.18215, labels   256   400K    712     ~7 days
  tld-256           tld-100m  SDXL-VAE latents / 8, pooled CLIP [768]         256   260K    139     ~21 h
  uvit-t2i          uvit-s/2  SD-VAE latents, 77 CLIP tokens [77, 768]        256     1M    116     ~2.8 days
                    (depth 16: U-ViT-S/2 Deep, MS-COCO; text_tokens=true)

Each reads a folder made once by python -m tld.prepare (.npy shards and a manifest; every GPU
streams its slice of each batch, nothing is loaded whole). On N GPUs, for example:

  accelerate launch --multi_gpu --num_processes N -m tld.prepare source=/data/imagenet/train \\
      out=data/imagenet256-sdvae size=256 codec=stabilityai/sd-vae-ft-ema flip=true
  python -m tld.prepare source=/data/cifar10/train out=data/cifar10-32 size=32 codec=none dtype=float32
  accelerate launch --multi_gpu --num_processes N -m tld.prepare source=/data/captioned out=data/text256-sdxlvae-clip \\
      size=256 codec=madebyollin/sdxl-vae-fp16-fix scale=0.125 text_encoder=openai/clip-vit-large-patch14
  accelerate launch --multi_gpu --num_processes N -m tld.prepare source=/data/coco/train out=data/mscoco256-sdvae-clip \\
      size=256 codec=stabilityai/sd-vae-ft-ema text_encoder=openai/clip-vit-large-patch14 text=tokens

then train (the global batch stays the preset's; add grad_accum=K if it does not fit):

  accelerate launch --multi_gpu --num_processes N -m tld.train preset=dit-xl2-imagenet data_root=data/imagenet256-sdvae

and on M machines: add --num_machines M --machine_rank R --main_process_ip HOST --main_process_port 29500.
Score with the FID-50K protocol: every process samples its slice into ADM's .npz (out=), then FID and KID
against ref= (ADM's reference batch .npz, an .npz of images, an image folder, or a prepared folder, whose
latents are decoded by the codec its manifest names), each figure named by its features= (inception, or
classifier for the offline shapes classifier):

  accelerate launch --multi_gpu --num_processes N -m tld.evaluate checkpoint=runs/dit-xl2-imagenet \\
      n=50000 out=samples.npz ref=VIRTUAL_imagenet256_labeled.npz features=inception sampler=ddpm steps=250 \\
      guidance=1.5 batch_size=125

(also: ref_n= to score against that many reference images spread over a prepared folder, captions= a
captioned prepared folder or text file for a text pipeline's prompts, codec= for latents of a run not
trained on a prepared folder). The README's "Full runs on real data" has every step.
"""


def config_from_args(args: list[str]) -> TrainConfig:
    """Build a config from ``preset=NAME key=value ...`` (later keys win)."""
    pairs = parse_key_values(args)
    values: dict = {}
    for k, v in pairs:
        if k == "preset":
            if v not in PRESETS:
                raise ValueError(f"unknown preset {v!r}; available: {', '.join(sorted(PRESETS))}")
            values.update(PRESETS[v])
    preset_model = values.get("model")
    overrides = {}
    names = {f.name: f for f in fields(TrainConfig)}
    for k, v in pairs:
        if k == "preset":
            continue
        if k.startswith("model."):
            overrides[k[len("model."):]] = parse_literal(v)
            continue
        if k not in names:
            raise ValueError(f"unknown config key {k!r}; valid keys: {', '.join(sorted(names))} "
                             f"(and model.<arg> for model constructor overrides)")
        values[k] = _coerce(names[k], v)
    cfg = TrainConfig(**values)
    if preset_model is not None and cfg.model != preset_model and "model_overrides" not in dict(pairs):
        # a preset's model.<arg> overrides are its own model's arguments: another model= starts from none
        cfg.model_overrides = {}
    cfg.model_overrides = {**cfg.model_overrides, **overrides}
    validate(cfg)
    return cfg


def _coerce(f: dataclasses.Field, v: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        return coerce_value(v, kind)
    except ValueError:
        raise ValueError(f"config key {f.name!r} expects a {kind}, got {v!r}") from None


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The config's learning rate at ``step`` (``tld.optim.lr_at`` with the config's arguments)."""
    return lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                 schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate(cfg: TrainConfig) -> None:
    choices = {
        "dataset": DATASETS,
        "conditioning": CONDITIONINGS,
        "schedule": tuple(diffusion.SCHEDULES),
        "prediction": diffusion.PREDICTIONS,
        "time_sampler": diffusion.TIME_SAMPLERS,
        "loss_weighting": diffusion.LOSS_WEIGHTINGS,
        "lr_schedule": LR_SCHEDULES,
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
    if cfg.dataset == "prepared" and not cfg.data_root:
        raise ValueError("dataset=prepared needs data_root=<a folder made by python -m tld.prepare>")
    encoded = ("tensors", "prepared")  # data whose text is already encoded
    if cfg.conditioning == "text" and cfg.dataset not in ("tensors", "prepared", "shapes", "folder"):
        raise ValueError(f"conditioning=text needs captions (dataset=shapes or folder) or text embeddings "
                         f"(dataset=prepared or tensors), got dataset={cfg.dataset!r}")
    if cfg.conditioning == "text" and cfg.dataset not in encoded and not cfg.text_encoder:
        raise ValueError(f"conditioning=text on dataset={cfg.dataset} needs text_encoder=tinyclip (trained "
                         f"here) or text_encoder=<a saved text encoder's folder>")
    if cfg.text_encoder and not (cfg.conditioning == "text" and cfg.dataset not in encoded):
        raise ValueError(f"text_encoder is used with conditioning=text on captioned data; got "
                         f"conditioning={cfg.conditioning!r}, dataset={cfg.dataset!r}")
    if cfg.codec and cfg.dataset in encoded:
        raise ValueError(f"codec={cfg.codec!r} encodes images, but dataset={cfg.dataset} is already encoded "
                         f"(its latents were made by the codec python -m tld.prepare named); leave codec empty")
    if cfg.text_tokens and not (cfg.conditioning == "text" and MODEL_PRESETS[cfg.model].cls.__name__ == "UViT"):
        raise ValueError(f"text_tokens=true trains U-ViT on the text token sequence: it needs conditioning=text and "
                         f"a U-ViT model, got conditioning={cfg.conditioning!r}, model={cfg.model!r}")
    if cfg.vlb_weight < 0:
        raise ValueError(f"vlb_weight must be >= 0, got {cfg.vlb_weight}")
    sched = diffusion.get_schedule(cfg.schedule)
    if cfg.t_max_train and not sched.t_min < cfg.t_max_train <= sched.t_max:
        raise ValueError(f"t_max_train={cfg.t_max_train} must be 0 (the whole range) or in ({sched.t_min}, "
                         f"{sched.t_max}], the times of schedule {cfg.schedule!r}")
    if cfg.log_with:
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType if t.value != "all"]
        for name in cfg.log_with.split(","):
            if name.strip() not in known:
                raise ValueError(f"log_with: unknown tracker {name.strip()!r}; accelerate's trackers: {', '.join(known)}")
    check_interval(cfg.sample_guidance_interval, "sample_guidance_interval")
    if cfg.cache_items < 1:
        raise ValueError(f"cache_items must be >= 1, got {cfg.cache_items}")
    if cfg.vae_decoder_steps < 0:
        raise ValueError(f"vae_decoder_steps must be >= 0 (0: no decoder fine-tuning), got {cfg.vae_decoder_steps}")
