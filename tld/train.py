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

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast
from torch import nn
from tqdm.auto import tqdm

from . import diffusion, io
from .config import GPU_RECIPES, PRESETS, TrainConfig, config_from_args, learning_rate, validate
from .models import count_parameters, create
from .optim import ema_decay_at, ema_update, fit_one_cycle
from .pipeline import TextToImage
from .prepare import manifest_encoders
from .runs import (
    TRAINED_ENCODERS,
    encoder_folder,
    latest_checkpoint,
    load_checkpoint_state,
    load_model,
    model_weights,
    save_checkpoint,
)
from .samplers import check_interval
from .samplers import generate as generate_samples
from .training_data import (
    StepBatchSampler,
    TensorFileDataset,
    TextCached,
    build_dataset,
    cache_latent_dataset,
    cache_text_dataset,
    model_kwargs,
    prepare_text_encoders,
    rank_slice,
    shapes_positions_kwargs,
    step_randomness,
)
from .viz import image_grid

__all__ = ["train", "main", "NonFiniteLoss", "save_pipeline", "save_samples", "generate", "sample_grid_labels",
           # the data side of a run, in tld.training_data; re-exported (lessons 06 call T.StepBatchSampler, ...)
           "build_dataset", "model_kwargs", "StepBatchSampler", "step_randomness", "rank_slice", "TensorFileDataset",
           "TextCached", "prepare_text_encoders", "cache_text_dataset", "shapes_positions_kwargs",
           # moved in the redesign, re-exported here for one release: import them from their new homes
           "TrainConfig", "PRESETS", "GPU_RECIPES", "config_from_args", "validate",     # tld.config
           "fit_one_cycle", "ema_update", "ema_decay_at", "lr_at",                      # tld.optim / tld.config
           "encoder_folder", "latest_checkpoint", "load_model", "TRAINED_ENCODERS"]     # tld.runs

# the config's schedule: tld.train.lr_at(cfg, step) as lessons 06 call it (tld.optim.lr_at takes explicit arguments)
lr_at = learning_rate

# ---------------------------------------------------------------------------------------------
# Samples during training (and for the demo and lessons)
# ---------------------------------------------------------------------------------------------


def sample_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


def generate(model: nn.Module, cfg_or_dict, labels: torch.Tensor | None, n: int | None = None, *, steps: int = 50,
             sampler: str = "ddim", guidance: float = 1.0, seed: int = 0, progress: bool = False,
             guidance_interval: tuple[float, float] | None = None, clamp: bool = True) -> torch.Tensor:
    """Samples in [-1, 1] for class labels (or n unconditional samples), with a training config's schedule
    and prediction (``tld.samplers.generate`` with those read from the config); ``clamp=False`` for a latent
    model, whose latents are not in [-1, 1] until they are decoded."""
    c = cfg_or_dict if isinstance(cfg_or_dict, dict) else asdict(cfg_or_dict)
    return generate_samples(model, c["schedule"], prediction=c["prediction"], cond=labels, n=n, steps=steps,
                            sampler=sampler, guidance=guidance, seed=seed, progress=progress,
                            guidance_interval=guidance_interval, clamp=clamp)


def save_samples(ema: nn.Module, cfg: TrainConfig, num_classes: int, path: Path, per_class: int = 2,
                 dataset=None, codec=None) -> Path:
    """A grid of samples from the EMA weights: every class, or the first 16 captions of a text run (guided as
    ``cfg.sample_guidance`` and ``cfg.sample_guidance_interval`` say)."""
    interval = check_interval(cfg.sample_guidance_interval, "sample_guidance_interval")
    if cfg.conditioning == "text":
        first = min(16, len(dataset))
        cond = torch.stack([dataset[i]["text"] for i in range(first)])
        images = generate(ema, cfg, cond, steps=cfg.sample_steps, sampler=cfg.sample_sampler,
                          guidance=cfg.sample_guidance, seed=cfg.seed, guidance_interval=interval,
                          clamp=codec is None)
    else:
        labels = sample_grid_labels(num_classes, per_class) if num_classes else None
        images = generate(ema, cfg, labels, n=16, steps=cfg.sample_steps, sampler=cfg.sample_sampler,
                          guidance=cfg.sample_guidance, seed=cfg.seed, guidance_interval=interval,
                          clamp=codec is None)
    if codec is not None:  # latents -> pixels
        with torch.no_grad():
            images = codec.decode(images.to(next(codec.parameters()).device)).clamp(-1, 1)
    if images.shape[1] != 3:  # latents without their codec: show the first three channels
        images = images[:, :3]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid((images.cpu() + 1) / 2, nrow=2 * per_class if num_classes else 4, scale=2).save(path)
    return path


def save_pipeline(cfg: TrainConfig, ema: nn.Module, text_encoder, codec, model_kw: dict, folder: Path) -> Path:
    """The EMA denoiser with its text encoder and codec as one TextToImage folder (tld.pipeline)."""
    pipe = TextToImage.for_training_run(copy.deepcopy(ema).cpu(), text_encoder, codec, asdict(cfg), model_kw)
    return pipe.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# The loop, in named steps: setup -> build -> resume -> (train_step -> after_step)* -> finish
# ---------------------------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Run:
    """Everything one training run holds, so each step of the loop is a short function of it."""

    cfg: TrainConfig
    accelerator: Accelerator
    out_dir: Path
    dataset: object
    num_classes: int
    schedule: diffusion.Schedule = None
    img_shape: tuple = ()
    text_encoder: object = None
    codec: object = None
    pipeline_note: str = ""          # a text run that saves no pipeline: why
    model: nn.Module = None          # what the optimizer steps (wrapped by accelerate: DDP, compile)
    raw_model: nn.Module = None      # the plain module, whose names checkpoints and the EMA use
    ema: nn.Module = None
    optimizer: object = None
    model_kw: dict = field(default_factory=dict)
    start_step: int = 0
    step: int = 0
    losses: list = field(default_factory=list)
    batches: object = None
    bar: object = None
    t_start: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def text(self) -> bool:
        return self.cfg.conditioning == "text"


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
    run = setup(cfg, accelerator)
    build(run)
    resume(run)
    start(run)
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
    while run.step < end:
        if cfg.max_minutes and _should_stop(run.accelerator, time.perf_counter() - run.t_start > 60 * cfg.max_minutes):
            break
        loss = train_step(run)
        after_step(run, loss)
    return finish(run)


def setup(cfg: TrainConfig, accelerator=None) -> Run:
    """Check the config, start accelerate, and get the data ready (a text run trains its encoders and
    encodes everything once into a cache first)."""
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if accelerator is None:
        _forget_other_precision(cfg.mixed_precision)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                                  log_with=_trackers(cfg), project_dir=cfg.out_dir)
    if cfg.mixed_precision != "no" and accelerator.device.type == "cpu":
        warnings.warn(f"mixed_precision={cfg.mixed_precision} on a CPU is far slower than fp32; use it on GPUs",
                      stacklevel=3)
    out_dir = Path(cfg.out_dir)
    dataset = build_dataset(cfg)
    num_classes = getattr(dataset, "num_classes", 0) if cfg.conditioning == "class" else 0
    run = Run(cfg, accelerator, out_dir, dataset, num_classes, diffusion.get_schedule(cfg.schedule))
    if run.text and cfg.dataset not in ("tensors", "prepared"):
        run.text_encoder, run.codec = prepare_text_encoders(cfg, accelerator, out_dir)
        run.dataset = cache_text_dataset(cfg, accelerator, dataset, run.text_encoder, run.codec, out_dir)
    elif cfg.codec:  # latent diffusion on labelled (or unlabelled) images: encode them once
        _, run.codec = prepare_text_encoders(cfg, accelerator, out_dir)
        run.dataset = cache_latent_dataset(cfg, accelerator, dataset, run.codec, out_dir)
    elif run.text and accelerator.is_main_process:  # encoded text: a pipeline only with the encoders that made it
        run.text_encoder, run.codec, why = manifest_encoders(dataset.manifest, accelerator.device) \
            if cfg.dataset == "prepared" else (None, None, "a dataset=tensors file records no encoders")
        run.pipeline_note = f"no pipeline saved: {why}" if why else ""
    run.img_shape = tuple(run.dataset[0]["image"].shape)
    return run


def build(run: Run) -> None:
    """The model, its EMA copy and the optimizer, identical on every rank."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    run.model_kw = model_kwargs(cfg, run.dataset)
    run.model = create(cfg.model, **run.model_kw)
    run.model.gradient_checkpointing = cfg.gradient_checkpointing
    if run.num_classes and (cfg.class_dropout > 0 or cfg.sample_guidance != 1.0):
        _ = run.model.null_class  # a model built without a null class says so now, not after training
    if cfg.init_from:
        init_weights(run.model, cfg.init_from, run.model_kw, cfg.model)
    run.ema = create(cfg.model, **run.model_kw)
    run.ema.load_state_dict(run.model.state_dict())
    run.ema.requires_grad_(False).eval()
    # the fused kernel updates every tensor in one launch on a GPU (same update, fp32 rounding apart)
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay, fused=run.accelerator.device.type == "cuda")


def _made_for(meta: dict, preset: str, model_kw: dict) -> bool:
    """Whether a saved folder's config.json names this model preset with these arguments (as JSON reads them)."""
    return meta["model"] == preset and meta["model_kwargs"] == json.loads(json.dumps(model_kw))


def init_weights(model: nn.Module, folder, model_kw: dict, preset: str) -> None:
    """Load the weights (EMA where the folder has them) of a model folder into ``model``, after checking
    that the folder was made for the same preset and arguments."""
    meta, state, file = model_weights(folder)
    if not _made_for(meta, preset, model_kw):
        raise ValueError(f"init_from={str(folder)!r} holds model {meta['model']!r} with {meta['model_kwargs']}, "
                         f"not {preset!r} with {model_kw}")
    io.load_exact(model, state, file, f"model {preset!r}")


def resume(run: Run) -> None:
    """With resume=true, continue from the latest checkpoint: weights, EMA, optimizer state and step (and
    fp16's loss scale). Nothing else is needed, because every step's randomness is a function of (seed, step)."""
    if not run.cfg.resume:
        return
    ckpt = latest_checkpoint(run.out_dir)
    if ckpt is None:
        if run.main:
            print(f"resume=true but no checkpoint in {run.out_dir}; starting from step 0")
        return
    meta = io.read_json(ckpt / "config.json")
    if not _made_for(meta, run.cfg.model, run.model_kw):
        raise ValueError(f"checkpoint {ckpt} was made for model {meta['model']!r} with {meta['model_kwargs']}, "
                         f"not {run.cfg.model!r} with {run.model_kw}")
    state = load_checkpoint_state(ckpt, run.model, run.ema, run.optimizer)
    run.start_step = run.step = state["step"]
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None and state.get("grad_scaler"):  # fp16: go on at the saved loss scale, not the initial one
        scaler.load_state_dict(state["grad_scaler"])
    if run.main:
        print(f"resumed from {ckpt} at step {run.start_step}")


def start(run: Run) -> None:
    """Write the run's config, hand the model to accelerate, and open the data stream and the log."""
    cfg, acc = run.cfg, run.accelerator
    if run.main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(run.out_dir / "config.json", {"train_config": asdict(cfg), "model_kwargs": run.model_kw})
    run.ema.to(acc.device)
    model = torch.compile(run.model) if cfg.compile else run.model
    run.model, run.optimizer = acc.prepare(model, run.optimizer)
    # the plain module (not the torch.compile wrapper), so checkpoints and the EMA see the usual names
    run.raw_model = acc.unwrap_model(run.model, keep_torch_compile=False)
    sampler = StepBatchSampler(len(run.dataset), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                               cfg.grad_accum, run.start_step, cfg.max_steps)
    run.batches = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=sampler, num_workers=cfg.num_workers))
    log = run.out_dir / "log.jsonl"
    if run.main and run.start_step == 0 and log.exists():
        log.unlink()
    if cfg.log_with:   # TensorBoard, W&B, ... through accelerate (their files in out_dir/<run name>/)
        acc.init_trackers(run.out_dir.name or "tld", config=_tracker_config(cfg))
    run.bar = tqdm(total=cfg.max_steps, initial=run.start_step, disable=not (run.main and cfg.progress),
                   desc="training", dynamic_ncols=True)
    run.t_start = time.perf_counter()
    run.model.train()


def train_step(run: Run) -> float:
    """One optimiser step on the global batch; returns its loss, averaged over every process."""
    cfg, acc = run.cfg, run.accelerator
    rank, world = acc.process_index, acc.num_processes
    # the whole global batch's times, noise and dropout mask, drawn from (seed, step): each rank
    # takes its own rows, so ranks draw different noise and a resume draws the same
    t_all, eps_all, drop_all = step_randomness(cfg, run.step, (cfg.batch_size, *run.img_shape),
                                               -1 if run.text else run.num_classes)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, run.step)
    step_loss = torch.zeros((), device=acc.device)
    for a in range(cfg.grad_accum):
        batch = next(run.batches)
        sl = rank_slice(cfg.batch_size, rank, world, cfg.grad_accum, a)
        x0 = batch["image"].to(acc.device)
        t, eps = t_all[sl].to(acc.device), eps_all[sl].to(acc.device)
        cond = batch["label"] if run.num_classes else batch["text"] if run.text else None
        if cond is not None:
            cond = cond.to(acc.device)
        if cond is not None and cfg.class_dropout > 0:  # classifier-free guidance: some become the null condition
            cond = run.raw_model.drop_condition(cond, drop_all[sl].to(acc.device))
        x_t = diffusion.add_noise(x0, eps, t, run.schedule)
        # gradients are all-reduced once per step, on the last micro-batch, not on every one
        sync = a == cfg.grad_accum - 1
        ctx = acc.no_sync(run.model) if not sync and world > 1 else contextlib.nullcontext()
        with ctx, acc.autocast():
            pred = run.model(x_t, t, cond)
            # L_simple (weighted as loss_weighting says); plus lambda T L_vlb for a model that predicts its variance
            loss = diffusion.hybrid_loss(pred, x0, eps, t, x_t, run.schedule, cfg.prediction, cfg.vlb_weight,
                                         cfg.loss_weighting, cfg.min_snr_gamma,
                                         cfg.edm_sigma_data).mean() / cfg.grad_accum
        acc.backward(loss)
        step_loss += loss.detach()
    # the logged loss is the mean over every process's micro-batches
    mean_loss = acc.reduce(step_loss, reduction="mean").item()
    if not math.isfinite(mean_loss):  # stop before the optimizer spreads it into the weights
        last = latest_checkpoint(run.out_dir)
        raise NonFiniteLoss(f"loss became {mean_loss} at step {run.step}; stopping without saving. "
                            f"The last good checkpoint is {last if last else '(none yet)'}")
    if cfg.grad_clip:
        acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    ema_update(run.ema, run.raw_model, ema_decay_at(run.step, cfg.ema_decay))
    return mean_loss


def after_step(run: Run, loss: float) -> None:
    """Count the step, then log, checkpoint and sample when their intervals come round."""
    cfg = run.cfg
    run.step += 1
    run.losses.append(loss)
    run.bar.update(1)
    step = run.step
    if run.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
        recent = run.losses[-cfg.log_every:]
        mean, lr = sum(recent) / len(recent), learning_rate(cfg, step - 1)
        run.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        with open(run.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": mean, "lr": lr,
                                "seconds": round(time.perf_counter() - run.t_start, 3)}) + "\n")
        if cfg.log_with:
            run.accelerator.log({"loss": mean, "lr": lr}, step=step)
    if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
        _save(run)
    if run.main and cfg.sample_every and step % cfg.sample_every == 0:
        save_samples(run.ema, cfg, run.num_classes, run.out_dir / "samples" / f"step_{step:07d}.png",
                     dataset=run.dataset, codec=run.codec)


def finish(run: Run) -> dict:
    """The last checkpoint, samples (and a text run's pipeline), and the run's summary."""
    run.bar.close()
    seconds = time.perf_counter() - run.t_start
    _save(run)
    if run.main:
        save_samples(run.ema, run.cfg, run.num_classes, run.out_dir / "samples" / f"step_{run.step:07d}.png",
                     dataset=run.dataset, codec=run.codec)
        if run.text_encoder is not None:
            save_pipeline(run.cfg, run.ema, run.text_encoder, run.codec, run.model_kw, run.out_dir / "pipeline")
        elif run.pipeline_note:
            print(run.pipeline_note, file=sys.stderr)
    steps_done = run.step - run.start_step
    summary = {"steps": run.step, "steps_this_run": steps_done, "seconds": seconds,
               "steps_per_second": steps_done / seconds if seconds > 0 else float("nan"),
               "final_loss": run.losses[-1] if run.losses else float("nan"), "out_dir": str(run.out_dir),
               "num_processes": run.accelerator.num_processes, "parameters": count_parameters(run.raw_model)}
    if run.text and run.main:
        summary["pipeline"] = run.pipeline_note or str(run.out_dir / "pipeline")
    if run.main:
        io.write_json(run.out_dir / "summary.json", summary)
    if run.cfg.log_with:
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    return summary


def _save(run: Run) -> None:
    run.accelerator.wait_for_everyone()
    if run.main:
        meta = {"train_config": asdict(run.cfg), "model": run.cfg.model, "model_kwargs": run.model_kw}
        scaler = getattr(run.accelerator, "scaler", None)
        if scaler is not None:  # fp16's loss scale and its growth count, so a resume continues them exactly
            meta["grad_scaler"] = scaler.state_dict()
        save_checkpoint(run.out_dir, run.step, run.raw_model, run.ema, run.optimizer, meta,
                        keep=run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _trackers(cfg: TrainConfig):
    """log_with=tensorboard,wandb -> accelerate's list of trackers (None: log.jsonl only)."""
    return [name.strip() for name in cfg.log_with.split(",") if name.strip()] or None


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config as trackers store it: numbers, strings and bools; anything else as its JSON text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in asdict(cfg).items()}


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one global state per process and refuses a second Accelerator with another
    precision; a single-process caller (a notebook, the tests) that switches precision gets a fresh one."""
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", mixed_precision) != mixed_precision \
            and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()


def _should_stop(accelerator, local: bool) -> bool:
    # every rank must stop at the same step, or DDP deadlocks: the main process decides
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


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
