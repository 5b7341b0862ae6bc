"""Side-by-side benchmarks against diffusers, printing tables (measured in one run).

    python -m tld.bench samplers     # accuracy vs the exact ODE solution, and per-step overhead
    python -m tld.bench spacing      # DPM-Solver++(2M) error for each step spacing (the default's evidence)
    python -m tld.bench train        # training steps/s and memory: tld's DiT vs diffusers' DiTTransformer2DModel
    python -m tld.bench data         # Shapes rendering rate, against what a training step consumes
    python -m tld.bench colab        # each training lesson's preset="colab": FLOPs, steps, estimated Colab T4 time
    python -m tld.bench prepare      # tld.prepare's images/s vs the encoder alone; streamed data vs a model step

Each subcommand is a function in ``COMMANDS``; add one (e.g. ``train``) by writing ``bench_train(argv)``
and registering it there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from . import quality
from .autoencoder import tiny_vae_config
from .config import config_from_args
from .data import ShapesDataset
from .diffusion import get_schedule
from .gmm import GMM, rms_error
from .models import create
from .prepare import PrepareConfig, PreparedDataset, load_codec_spec
from .prepare import prepare as prepare_folder
from .samplers import sample
from .train import StepBatchSampler, build_dataset, model_kwargs

STEPS = (5, 10, 20, 50)
OURS = ("ddim", "euler", "dpm++2m", "dpm++3m")


# ---------------------------------------------------------------------------------------------
# The closed-form problem and diffusers' schedulers driven by its exact denoiser
# ---------------------------------------------------------------------------------------------


def gmm_problem(n: int = 64, seed: int = 1, schedule: str = "vp-linear"):
    """The shared test problem: GMM.random(6 components, 4-d), n starting noises, the exact ODE solution.

    vp-linear because its t = k / 1000 is diffusers' integer timestep k exactly.
    """
    gmm = GMM.random(k=6, dim=4, seed=0)
    noise = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    sched = get_schedule(schedule)
    t_max = 0.999 if sched.name == "rectified" else sched.t_max
    x = noise if sched.variance_preserving else noise * sched.sigma(torch.tensor(t_max)).item()
    return gmm, noise, gmm.reference(x, sched, t_max, None)


def diffusers_scheduler(name: str, **config):
    """diffusers' scheduler with DDPM's linear betas (1e-4..0.02, 1000 steps), i.e. our vp-linear."""
    import diffusers

    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
    if name == "ddim":
        return diffusers.DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True, **config)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2, **config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**base, **config)
    raise ValueError(f"no diffusers scheduler for {name!r}; expected ddim, dpm++2m or euler")


def run_diffusers(scheduler, model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' sampling loop with ``model(x, t, cond)`` (eps, vp-linear) and t = timestep / 1000.

    Schedulers that step in sigma~ (Euler) scale the input; the model then sees the VP x and the t
    whose sigma~ is the scheduler's (it interpolates sigma~ between integer steps).
    """
    schedule = get_schedule("vp-linear")
    scheduler.set_timesteps(steps)
    sigmas = getattr(scheduler, "sigmas", None)
    scaled = hasattr(scheduler, "scale_model_input") and type(scheduler).__name__.startswith("Euler")
    x = noise * scheduler.init_noise_sigma
    for i, k in enumerate(scheduler.timesteps):
        if scaled:
            st = sigmas[i].double()
            t = schedule.t_from_log_snr(-2 * torch.log(st)).to(noise.dtype)
        else:
            t = torch.tensor(float(k) / 1000, dtype=noise.dtype)
        xin = scheduler.scale_model_input(x, k)
        eps = model(xin, t.expand(len(x)), None)
        x = scheduler.step(eps, k, x).prev_sample
    return x


# ---------------------------------------------------------------------------------------------
# samplers: accuracy and overhead
# ---------------------------------------------------------------------------------------------


def accuracy_table(steps=STEPS) -> dict:
    """RMS error against the exact solution, {(who, sampler): [error per step count]}."""
    gmm, noise, ref = gmm_problem()
    model = gmm.model("vp-linear", "eps")
    rows = {}
    for name in OURS:
        rows["tld", name] = [rms_error(sample(model, noise, "vp-linear", sampler=name, steps=n, prediction="eps",
                                              progress=False), ref) for n in steps]
    for name in ("ddim", "euler", "dpm++2m"):
        rows["diffusers", name] = [rms_error(run_diffusers(diffusers_scheduler(name), model, noise, n), ref)
                                   for n in steps]
    return rows


def overhead(sampler: str = "dpm++2m", steps: int = 20, repeats: int = 15, shape=(8, 4, 32, 32)) -> dict:
    """Median time per step spent outside the model call, ours vs diffusers, measured alternately."""
    cost = {"model": 0.0}

    def model(x, t, cond=None):  # a near-free model whose own time we subtract
        t0 = time.perf_counter()
        out = x * 0.5
        cost["model"] += time.perf_counter() - t0
        return out

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    names = {"ddim": "ddim", "dpm++2m": "dpm++2m", "euler": "euler"}
    sched = diffusers_scheduler(names[sampler], **({"timestep_spacing": "trailing"} if sampler == "ddim" else {}))

    def ours():
        sample(model, noise, "vp-linear", sampler=sampler, steps=steps, prediction="eps", progress=False)

    def theirs():
        with torch.no_grad():
            run_diffusers(sched, model, noise, steps)

    times = {"tld": [], "diffusers": []}
    for _ in range(2):  # warm-up
        ours(), theirs()
    for _ in range(repeats):
        for who, fn in (("tld", ours), ("diffusers", theirs)):
            cost["model"] = 0.0
            t0 = time.perf_counter()
            fn()
            times[who].append((time.perf_counter() - t0 - cost["model"]) / steps)
    return {who: statistics.median(v) for who, v in times.items()}


def bench_samplers(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tld.bench samplers")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("error against the exact probability-flow ODE solution (RMS per coordinate; GMM.random(6, 4-d),")
    print("vp-linear = diffusers' linear betas, eps model, 64 samples; each sampler at its default spacing)")
    rows = accuracy_table()
    print(f"{'':10s} {'sampler':9s} " + " ".join(f"{n:>9d}" for n in STEPS) + "   (steps = model calls)")
    for (who, name), errs in rows.items():
        print(f"{who:10s} {name:9s} " + " ".join(f"{e:9.2e}" for e in errs))
    ratio = rows["diffusers", "dpm++2m"][STEPS.index(10)] / rows["tld", "dpm++2m"][STEPS.index(10)]
    print(f"2M at 10 steps: diffusers' error / ours = {ratio:.2f}x")
    print()
    print("overhead per step outside the model call (median of alternating runs; [8, 4, 32, 32] float32)")
    out = {"accuracy": rows, "overhead": {}}
    for name in ("ddim", "dpm++2m", "euler"):
        o = overhead(name, repeats=args.repeats)
        out["overhead"][name] = o
        print(f"{name:9s} tld {o['tld'] * 1e6:8.1f} us   diffusers {o['diffusers'] * 1e6:8.1f} us   "
              f"diffusers / tld = {o['diffusers'] / o['tld']:.2f}x")
    return out


def bench_spacing(argv=None) -> dict:
    """DPM-Solver++(2M) error for each spacing, schedule and step count: the evidence for the default."""
    torch.set_num_threads(1)
    out = {}
    print("DPM-Solver++(2M) RMS error against the exact solution, GMM.random(6, 4-d), eps model")
    print(f"{'schedule':10s} {'spacing':7s} " + " ".join(f"{n:>9d}" for n in STEPS))
    for schedule in ("vp-linear", "vp-cosine", "rectified"):
        gmm, noise, ref = gmm_problem(schedule=schedule)
        model = gmm.model(schedule, "eps")
        for spacing in ("time", "logsnr", "karras"):
            errs = [rms_error(sample(model, noise, schedule, sampler="dpm++2m", steps=n, prediction="eps",
                                     spacing=spacing, progress=False), ref) for n in STEPS]
            out[schedule, spacing] = errs
            print(f"{schedule:10s} {spacing:7s} " + " ".join(f"{e:9.2e}" for e in errs))
    return out


# ---------------------------------------------------------------------------------------------
# train: steps/s and memory of a DiT training step, ours vs diffusers'; checkpointing; GFLOP/s
# ---------------------------------------------------------------------------------------------


def dit_pair(size: int = 16, width: int = 384, depth: int = 6, heads: int = 6, patch: int = 2,
             classes: int = 1000, channels: int = 4):
    """tld's DiT and diffusers' DiTTransformer2DModel with the same configuration (eps only)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ours = create("dit-s/2", img_size=size, patch_size=patch, in_chans=channels, embed_dim=width, depth=depth,
                  num_heads=heads, num_classes=classes, learn_sigma=False)
    theirs = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                   in_channels=channels, out_channels=channels, num_layers=depth,
                                   sample_size=size, patch_size=patch, num_embeds_ada_norm=classes)
    return ours, theirs


def make_step(model, who: str, batch: int, device, amp_dtype=None, compile: bool = False):
    """One optimiser step (forward, MSE loss, backward, AdamW) as a closure; returns (step, loss_fn).

    ``compile=True`` runs the forward through ``torch.compile`` (the model's weights are shared).
    Both models get the same optimiser: fused AdamW on a GPU, as tld's trainer uses there.
    """
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(0)
    c = getattr(model, "in_chans", None) or model.config.in_channels
    size = getattr(model, "img_size", None) or model.config.sample_size
    x = torch.randn(batch, c, size, size, generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def loss_fn():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if who == "tld":
                out = forward(x, t, y)
            else:  # diffusers' DiT embeds the integer timestep 0..999, as the DiT reference does
                out = forward(x, timestep=(t * 999).long(), class_labels=y, return_dict=False)[0]
        return (out.float() - target).pow(2).mean()

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, loss_fn


def saved_activation_bytes(model, loss_fn) -> int:
    """Bytes of the tensors autograd keeps for backward (the activation memory), parameters excluded.

    Every saved tensor stays alive until backward, so their storages are distinct and their sum is
    what one forward holds; a CPU has no allocator statistics, this is the sound measure there.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: each gradient it computes (input, weight) costs one forward convolution.

    torch's own formula counts the weight gradient as if the convolution were dense, ignoring groups: a
    depthwise 3x3 (the conv MLP of TLD and uvit-course) then counts ~channels / 2 times its real cost.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def step_flops(loss_fn) -> int:
    """FLOPs of ``loss_fn().backward()`` (forward + backward), torch.utils.flop_counter's count with grouped
    convolutions' backward counted right."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}) \
            as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def matmul_peak(device, n: int = 1024, repeats: int = 10, dtype=torch.float32) -> float:
    """This machine's measured matmul rate (GFLOP/s): the best of several n x n products."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fns: dict, device, repeats: int, steps: int) -> dict:
    """Median seconds per step of each closure, measured alternately so load hits both alike."""
    for fn in fns.values():  # warm-up
        fn(), fn()
    times = {who: [] for who in fns}
    for _ in range(repeats):
        for who, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[who].append((time.perf_counter() - t0) / steps)
    return {who: statistics.median(v) for who, v in times.items()}


def peak_cuda_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def checkpointing_saving(preset: str = "uvit-course", batch: int = 16, device=None) -> dict:
    """Activation memory of a U-ViT preset with and without per-block gradient checkpointing."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = create(preset).to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=g).to(device) if model.num_classes else None
    out = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        out[on] = saved_activation_bytes(model, lambda: model(x, t, y).pow(2).mean())
    return {"preset": preset, "batch": batch, "plain": out[False], "checkpointed": out[True],
            "saving": 1 - out[True] / out[False]}


def bench_train(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tld.bench train")
    p.add_argument("--size", type=int, default=16, help="latent size (16: 128px images through an SD VAE)")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    p.add_argument("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores (Ampere and newer)")
    p.add_argument("--compile", action="store_true", help="time both models under torch.compile (inductor)")
    p.add_argument("--uvit", default="uvit-course", help="U-ViT preset for the checkpointing measurement")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if args.bf16 else None
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ours, theirs = dit_pair(args.size, args.width, args.depth, args.heads)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    steps, losses = {}, {}
    for who, model in (("tld", ours), ("diffusers", theirs)):
        steps[who], losses[who] = make_step(model, who, args.batch, device, amp)
        if args.compile:  # FLOPs and saved activations are counted eagerly; the timed steps are compiled
            steps[who], _ = make_step(model, who, args.batch, device, amp, compile=True)
    where = (torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"DiT training step, {where}, {'bf16 autocast' if amp else 'tf32' if args.tf32 else 'fp32'}"
          f"{', torch.compile' if args.compile else ', eager'}: latents {args.size}x{args.size}x4, "
          f"patch 2, width {args.width}, depth {args.depth}, heads {args.heads}, batch {args.batch}, AdamW")
    print(f"parameters: tld {n_ours:,}  diffusers {n_theirs:,}")
    flops = {who: step_flops(losses[who]) for who in steps}
    act = {who: saved_activation_bytes(m, losses[who]) for who, m in (("tld", ours), ("diffusers", theirs))}
    sec = time_steps(steps, device, args.repeats, args.steps)
    peak = {who: peak_cuda_bytes(steps[who]) for who in steps} if device.type == "cuda" else None
    mm = matmul_peak(device, 4096 if device.type == "cuda" else 1024,
                     dtype=torch.bfloat16 if amp else torch.float32)
    print(f"{'':10s} {'steps/s':>8s} {'ms/step':>8s} {'act. MB':>8s} {'state MB':>9s} "
          f"{'peak MB' if peak else '':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'of peak':>8s}")
    rows = {}
    for who, model in (("tld", ours), ("diffusers", theirs)):
        state = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, Adam m and v
        rate = flops[who] / sec[who] / 1e9
        rows[who] = dict(steps_per_s=1 / sec[who], act_bytes=act[who], state_bytes=state, flops=flops[who],
                         gflops_per_s=rate, peak_bytes=peak[who] if peak else None)
        print(f"{who:10s} {1 / sec[who]:8.2f} {1e3 * sec[who]:8.1f} {act[who] / 2**20:8.1f} {state / 2**20:9.1f} "
              f"{f'{peak[who] / 2**20:.1f}' if peak else '':>8} {flops[who] / 1e9:11.2f} {rate:8.1f} {rate / mm:8.0%}")
    speed = sec["diffusers"] / sec["tld"]
    mem = (peak["tld"] / peak["diffusers"]) if peak else act["tld"] / act["diffusers"]
    print(f"tld / diffusers: {speed:.2f}x the steps/s, {mem:.2f}x the "
          f"{'peak memory' if peak else 'activation memory'}  (medians of {args.repeats} alternating repeats "
          f"of {args.steps} steps)")
    print(f"matmul peak measured here: {mm:.1f} GFLOP/s ({'4096' if device.type == 'cuda' else '1024'}^2 "
          f"{'bf16' if amp else 'fp32'})")
    ck = checkpointing_saving(args.uvit, device=device)
    print(f"gradient checkpointing on {ck['preset']} (batch {ck['batch']}): activations {ck['plain'] / 2**20:.1f} MB"
          f" -> {ck['checkpointed'] / 2**20:.1f} MB, saving {ck['saving']:.0%} (bytes saved for backward)")
    return {"rows": rows, "speed_ratio": speed, "memory_ratio": mem, "matmul_gflops": mm, "checkpointing": ck}


def render_vs_step(preset: str = "uvit-course", size: int = 32, batch: int = 64, repeats: int = 5) -> dict:
    """Seconds to render one batch of Shapes images against one training step on it, alternated.

    The ratio is what matters: under any load both slow down alike, and a ratio far below 1 means the
    renderer never makes training wait.
    """
    ds = ShapesDataset(size=size, length=batch * (repeats + 2))
    torch.manual_seed(0)
    model = create(preset, img_size=size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 3, size, size), torch.rand(batch)
    y = torch.randint(0, max(model.num_classes, 1), (batch,)) if model.num_classes else None

    def render(r):
        for i in range(batch):
            ds[r * batch + i]

    def step(_):
        model(x, t, y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    render(0), step(0)  # warm-up
    times = {"render": [], "step": []}
    for r in range(1, repeats + 1):
        for who, fn in (("render", render), ("step", step)):
            t0 = time.perf_counter()
            fn(r)
            times[who].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "size": size, "batch": batch, "render_s": med["render"], "step_s": med["step"],
            "images_per_s": batch / med["render"], "ratio": med["render"] / med["step"]}


def bench_data(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tld.bench data")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the training step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = render_vs_step(size=args.size, batch=args.batch, repeats=args.repeats)
    print(f"Shapes {r['size']}x{r['size']}, batch {r['batch']}, one process, {args.threads} torch thread(s); "
          f"medians of {args.repeats} alternating repeats")
    print(f"render one batch:            {1e3 * r['render_s']:8.1f} ms  ({r['images_per_s']:,.0f} images/s)")
    print(f"one {r['preset']} training step: {1e3 * r['step_s']:8.1f} ms")
    print(f"rendering / training step:   {r['ratio']:8.3f}  (below 1: the data never makes training wait)")
    return r


# ---------------------------------------------------------------------------------------------
# prepare: images/s of tld.prepare against its encoder alone; the streamed data against a model step
# ---------------------------------------------------------------------------------------------


def _image_folder(root: Path, n: int, size: int, classes: int = 4) -> Path:
    """n random JPEGs (quality 90, 5:4, a little larger than `size`: ADM's crop has work to do) in class folders."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        a = torch.randint(0, 256, (size * 9 // 8, size * 45 // 32, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(a).save(d / f"{i:06d}.jpg", quality=90)
    return root


def prepare_vs_encoder(n: int = 256, size: int = 64, batch: int = 32, codec: str = "", workers: int = 0,
                       model: str = "uvit-course", train_batch: int = 64, steps: int = 10) -> dict:
    """One run, side by side: (1) the codec's forward pass alone on ready tensors, (2) the whole prepare
    (decode, ADM crop, encode, write) of n images, (3) reading one global batch from the prepared folder
    as the trainer does, alternated with (4) one training step of `model` on it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="tld-bench-prepare-"))
    src = _image_folder(tmp / "images", n, size)
    if not codec:  # a tiny AutoencoderKL with random weights: the speed of the path, not of the SD VAE
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        AutoencoderKL(**tiny_vae_config(widths=(32, 64, 64, 64))).save_pretrained(tmp / "vae")
        codec = str(tmp / "vae")
    cfg = PrepareConfig(source=str(src), out=str(tmp / "prepared"), size=size, codec=codec, batch_size=batch,
                        workers=workers, progress=False)
    enc = load_codec_spec(cfg, device)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        enc.encode(x)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch)):
            enc.encode(x)
        _sync(device)
    encoder_s = (time.perf_counter() - t0) / (max(1, n // batch) * batch)
    t0 = time.perf_counter()
    prepare_folder(cfg)
    prepare_s = (time.perf_counter() - t0) / n
    ds = PreparedDataset(cfg.out, "class")
    sampler = StepBatchSampler(len(ds), min(train_batch, len(ds)), 0, 0, 1, 1, 0, steps + 1)
    batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler))
    torch.manual_seed(0)
    item = ds[0]["image"]
    net = create(model, img_size=item.shape[-1], in_chans=item.shape[0], num_classes=ds.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(b):
        x0, y = b["image"].to(device), b["label"].to(device)
        net(x0, torch.rand(len(x0), device=device), y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    step(next(batches))  # warm-up
    data_t, step_t = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(batches)
        data_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(b)
        step_t.append(time.perf_counter() - t0)
    folder_bytes = sum(f.stat().st_size for f in Path(cfg.out).rglob("*.npy"))
    return {"device": str(device), "n": n, "size": size, "batch": batch, "workers": workers,
            "latent_shape": list(item.shape), "model": model, "train_batch": sampler.B,
            "encoder_images_per_s": 1 / encoder_s, "prepare_images_per_s": 1 / prepare_s,
            "prepare_vs_encoder": encoder_s / prepare_s, "data_s_per_step": statistics.median(data_t),
            "model_s_per_step": statistics.median(step_t),
            "data_vs_model": statistics.median(data_t) / statistics.median(step_t), "folder_bytes": folder_bytes}


def bench_prepare(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tld.bench prepare")
    p.add_argument("--n", type=int, default=256, help="generated JPEGs to prepare")
    p.add_argument("--size", type=int, default=64, help="prepare's size= (pixels)")
    p.add_argument("--batch", type=int, default=32, help="prepare's batch_size=")
    p.add_argument("--codec", default="", help="a VAE folder or cached hub id (default: a tiny random AutoencoderKL)")
    p.add_argument("--workers", type=int, default=0, help="prepare's workers= (decoding processes)")
    p.add_argument("--model", default="uvit-course", help="the model whose training step the data is set against")
    p.add_argument("--batch-size", type=int, default=64, help="the trainer's global batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = prepare_vs_encoder(args.n, args.size, args.batch, args.codec, args.workers, args.model, args.batch_size,
                           args.steps)
    print(f"tld.prepare on {r['n']} generated {r['size']}px-crop JPEGs, batch {r['batch']}, {r['workers']} loader "
          f"workers, device {r['device']}, {args.threads} torch thread(s); latents {'x'.join(map(str, r['latent_shape']))}")
    print(f"{'':38s} {'images/s':>10s}")
    print(f"{'encoder forward alone (its limit)':38s} {r['encoder_images_per_s']:10.1f}")
    print(f"{'prepare: decode, crop, encode, write':38s} {r['prepare_images_per_s']:10.1f}   "
          f"{r['prepare_vs_encoder']:.0%} of the encoder's rate")
    print(f"trainer on the prepared folder ({r['folder_bytes'] / 2**20:.1f} MB), global batch {r['train_batch']}, "
          f"medians of {args.steps} alternating steps:")
    print(f"{'data: one batch from the shards':38s} {1e3 * r['data_s_per_step']:10.2f} ms")
    print(f"{'model step (' + r['model'] + ')':38s} {1e3 * r['model_s_per_step']:10.2f} ms   "
          f"data / model step = {r['data_vs_model']:.3f} (below 1: the data never makes training wait)")
    return r


# ---------------------------------------------------------------------------------------------
# colab: what each training lesson trains at preset="colab", and its estimated time on a Colab T4
# ---------------------------------------------------------------------------------------------

# NVIDIA's T4 datasheet: 65 TFLOP/s fp16 on tensor cores, 8.1 TFLOP/s fp32 (Turing has no TF32 or bf16)
T4_PEAK = {"fp16": 65e12, "fp32": 8.1e12}
# An assumption, not a measurement: the share of that peak small models like these reach
T4_FRACTION = 0.25
# Measured (README, Benchmarks): `python -m tld.train preset=cpu-demo mixed_precision=bf16 max_steps=600` ran
# 28.2 steps/s on one H100, under 0.2% of its peak: a step that small is paid for in host time (Python,
# dispatch, kernel launches, rendering the batch), so steps/s there give a per-operator host cost
H100_CPU_DEMO_STEPS_PER_S = 28.2

# Each training lesson's preset="colab" configuration, mirrored from the notebooks (tests/test_bench.py runs
# the lessons' configuration cells with preset="colab" and CUDA reported present, and checks them against
# this table: change both together). Lessons that train through tld.train give their key=value arguments;
# lesson 05 trains by hand, and gives its parameters. ``steps`` is every optimiser step of one run of ``runs``;
# ``extra`` holds runs with their own configuration (lessons 04 and 05's cpu-lesson model that draws, the same
# recipe at every preset: fp32, 1,000 steps for 04's U-ViT, 2,000 for 05's DiT).
CPU_LESSON_DIT = dict(train=["preset=cpu-lesson", "model=dit-course", "model.patch_size=4", "model.embed_dim=64",
                             "model.depth=4", "model.num_heads=4", "max_steps=2000"], steps=2000, precision="fp32")
COLAB_LESSONS = {
    "04_uvit_long_skips": dict(
        precision="fp16", steps=1000, note="three runs, one per skip; the cpu-lesson U-ViT",
        train=["preset=smoke", "max_steps=1000", "batch_size=64", "mixed_precision=fp16", "lr=2e-3",
               "warmup_steps=20", "log_every=10", "prediction=x0", "model.depth=6", "model.embed_dim=48",
               "model.patch_size=2", "model.num_heads=4"],
        runs={"skip=None": ["model.skip=none"], "skip=add": ["model.skip=add"],
              "skip=concat": ["model.skip=concat"]},
        extra={"cpu-lesson U-ViT": dict(train=["preset=cpu-lesson"], steps=1000, precision="fp32")}),
    "05_dit_adaln_zero": dict(
        precision="fp32", steps=1500, note="four arms, trained by hand in fp32; the cpu-lesson DiT",
        hand=dict(image_size=32, patch_size=4, width=128, depth=4, heads=4, batch_size=32, steps=1500),
        runs={"in-context": [], "adaLN-Zero": [], "cross-attention (TLD)": [], "TLD, plain MLP": []},
        extra={"cpu-lesson DiT": CPU_LESSON_DIT}),
    "06_training_loop": dict(
        # the hand-written loop (2000) and tld.train's first 200 steps of it, then the short runs of sections 4-6: 3 + 3 (4 x 8
        # accumulated) + 3 (checkpointed) + 40 + 20 + 20 (resumed), counted here at the main run's cost
        precision="fp32", steps=2000 + 200 + 89, note="hand loop + tld.train's first 200 steps, fp32",
        train=["image_size=32", "batch_size=32", "max_steps=2000", "lr=0.002", "ema_decay=0.95", "warmup_steps=20",
               "model=uvit-course", "model.patch_size=4", "model.embed_dim=64", "model.depth=4",
               "model.conv_mlp=false", "prediction=x0", "loss_weighting=min-snr", "min_snr_gamma=5",
               "shapes_positions=center", "deterministic=true"],
        runs={"uvit-course, width 64": []}),
    "11_udit_downsampled_tokens": dict(
        # the U-DiT the lesson trains beside the shipped shapes-udit (the cpu-lesson recipe, fp32 at every preset)
        precision="fp32", steps=1000, note="the U-DiT trained beside the shipped shapes-udit, fp32",
        train=["preset=cpu-lesson", "model=udit-course", "model.learn_sigma=false", "loss_weighting=none",
               "max_steps=1000"],
        runs={"udit-course, 16 px": []}),
    "12_full_training_run": dict(
        # the run, then a copy resumed from its earliest kept checkpoint (cpu-demo saves every 200 steps and
        # keeps 2: step 2800): 3000 + 200
        precision="fp16", steps=3000 + 200, note="the cpu-demo recipe; the run + its resumed last 200 steps",
        train=["preset=cpu-demo", "max_steps=3000", "max_minutes=0", "mixed_precision=fp16", "deterministic=true"],
        runs={"uvit-course (cpu-demo)": []}),
}


def colab_config(lesson: str, run: str):
    """The TrainConfig of one run of a tld.train lesson's colab preset (as the lesson builds it on a GPU)."""
    spec = COLAB_LESSONS[lesson]
    if run in spec.get("extra", {}):
        return config_from_args(spec["extra"][run]["train"])
    return config_from_args(spec["train"] + spec["runs"][run])


def _config_row(lesson: str, run: str, precision: str, steps: int) -> dict:
    cfg = colab_config(lesson, run)
    kw = model_kwargs(cfg, build_dataset(cfg))
    return dict(lesson=lesson, run=run, make=lambda: create(cfg.model, **kw), batch=cfg.batch_size,
                size=kw["img_size"], classes=kw["num_classes"], precision=precision, steps=steps)


def lesson05_models(hand: dict) -> dict:
    """Lesson 05's four arms, built as its training cell builds them."""
    common = dict(img_size=hand["image_size"], in_chans=3, num_classes=18, patch_size=hand["patch_size"])
    width, depth, heads = hand["width"], hand["depth"], hand["heads"]
    tld_kw = dict(embed_dim=width, depth=depth, head_dim=width // heads, noise_embed_dim=64, **common)
    return {
        "in-context": lambda: create("dit-course", conditioning="in-context", embed_dim=width, depth=depth,
                                     num_heads=heads, **common),
        "adaLN-Zero": lambda: create("dit-course", embed_dim=width, depth=depth, num_heads=heads, **common),
        "cross-attention (TLD)": lambda: create("tld-course", **tld_kw),
        "TLD, plain MLP": lambda: create("tld-course", conv_mlp=False, **tld_kw),
    }


def colab_runs() -> list[dict]:
    """Every run of the table: lesson, run, a model factory, its batch, image size and classes."""
    out = []
    for lesson, spec in COLAB_LESSONS.items():
        if "hand" in spec:
            h = spec["hand"]
            for run, make in lesson05_models(h).items():
                out.append(dict(lesson=lesson, run=run, make=make, batch=h["batch_size"], size=h["image_size"],
                                classes=18, precision=spec["precision"], steps=spec["steps"]))
        else:
            out += [_config_row(lesson, run, spec["precision"], spec["steps"]) for run in spec["runs"]]
        out += [_config_row(lesson, run, x["precision"], x["steps"]) for run, x in spec.get("extra", {}).items()]
    return out


def _closure(model, batch: int, size: int, classes: int, amp: bool = False):
    """forward + MSE loss on a fixed random batch, as one training step computes it; returns loss_fn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_chans, size, size, generator=g)
    target = torch.randn(x.shape, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, max(classes, 1), (batch,), generator=g) if classes else None

    def loss_fn():
        # a T4 autocasts to fp16; a CPU's autocast (bf16) casts the same operators, so it counts them alike
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x, t, y)
        return (out.float() - target).pow(2).mean()

    return loss_fn


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators a region calls (each one host-side work, and on a GPU a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_ops(loss_fn) -> int:
    """ATen operators in one forward + backward (independent of the batch size)."""
    with _OpCounter() as counter:
        loss_fn().backward()
    return counter.count


def cpu_step_seconds(model, loss_fn, repeats: int) -> float:
    """Median seconds of one fp32 training step (forward, backward, AdamW) on this CPU, after a warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def colab_table(flop_batch: int = 8, time_repeats: int = 1) -> dict:
    """Per run and per lesson: parameters, FLOPs, steps, CPU seconds per step and the T4 estimates.

    FLOPs are counted at ``flop_batch`` (at most the run's batch) and scaled linearly to the run's batch,
    which is exact: every counted operator (matmuls, convolutions, attention) is per example.
    """
    torch.manual_seed(0)
    calib = create("uvit-course")  # the measured cpu-demo step, counted the same way
    host_per_op = 1 / H100_CPU_DEMO_STEPS_PER_S / step_ops(_closure(calib, 2, 32, 18, amp=True))
    rows, lessons = [], {}
    for r in colab_runs():
        torch.manual_seed(0)
        model = r["make"]().train()
        b = min(flop_batch, r["batch"])
        flops = step_flops(_closure(model, b, r["size"], r["classes"])) * r["batch"] / b
        model.zero_grad(set_to_none=True)
        ops = step_ops(_closure(model, 2, r["size"], r["classes"], amp=r["precision"] == "fp16"))
        model.zero_grad(set_to_none=True)
        cpu_s = (cpu_step_seconds(model, _closure(model, r["batch"], r["size"], r["classes"]), time_repeats)
                 if time_repeats else float("nan"))
        total = flops * r["steps"]
        peak = T4_PEAK[r["precision"]]
        row = dict(lesson=r["lesson"], run=r["run"], params=sum(p.numel() for p in model.parameters()),
                   batch=r["batch"], gflop_per_step=flops / 1e9, steps=r["steps"], tflop=total / 1e12,
                   precision=r["precision"], cpu_s_per_step=cpu_s, ops_per_step=ops,
                   t4_at_peak_s=total / peak, t4_at_fraction_s=total / (T4_FRACTION * peak),
                   host_floor_s=r["steps"] * ops * host_per_op)
        row["t4_estimate_s"] = max(row["t4_at_fraction_s"], row["host_floor_s"])
        rows.append(row)
        agg = lessons.setdefault(r["lesson"], dict(lesson=r["lesson"], steps=0, tflop=0.0, t4_at_peak_s=0.0,
                                                   t4_at_fraction_s=0.0, host_floor_s=0.0, t4_estimate_s=0.0))
        for k in ("steps", "tflop", "t4_at_peak_s", "t4_at_fraction_s", "host_floor_s", "t4_estimate_s"):
            agg[k] += row[k]
    return {"rows": rows, "lessons": lessons, "host_s_per_op": host_per_op, "flop_batch": flop_batch}


def bench_colab(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tld.bench colab")
    p.add_argument("--flop-batch", type=int, default=8,
                   help="count FLOPs at this batch, scaled linearly to each run's (exact: every op is per example)")
    p.add_argument("--repeats", type=int, default=1, help="timed CPU steps per run (0: skip the CPU timing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on this CPU")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = colab_table(args.flop_batch, args.repeats)
    print('preset="colab" of each training lesson, one row per model it trains: the FLOPs of one training step')
    print(f"(torch.utils.flop_counter, forward + backward, counted at batch {args.flop_batch} and scaled linearly), "
          f"one fp32 step timed on this CPU")
    print(f"({args.threads} thread(s)), and estimates for a Colab T4 from the FLOPs and the operator count: "
          f"no GPU measured.")
    times = f"{'T4 100%':>8s} {'T4 25%':>8s} {'host':>8s} {'T4 est.':>8s}"
    print(f"{'lesson':26s} {'run':22s} {'params':>9s} {'batch':>5s} {'GFLOP/step':>10s} {'prec':>4s} "
          f"{'CPU s/step':>10s} {'steps':>6s} {'TFLOP':>6s} {times}")

    def spans(r):
        return " ".join(f"{_duration(r[k]):>8s}" for k in ("t4_at_peak_s", "t4_at_fraction_s", "host_floor_s",
                                                              "t4_estimate_s"))

    for r in res["rows"]:
        print(f"{r['lesson']:26s} {r['run']:22s} {r['params']:>9,} {r['batch']:>5d} {r['gflop_per_step']:>10.2f} "
              f"{r['precision']:>4s} {r['cpu_s_per_step']:>10.2f} {r['steps']:>6d} {r['tflop']:>6.1f} {spans(r)}")
    print()
    print(f"{'lesson (all its runs)':26s} {'':67s} {'steps':>6s} {'TFLOP':>6s} {times}")
    for name, a in res["lessons"].items():
        print(f"{name:26s} {COLAB_LESSONS[name]['note']:67s} {a['steps']:>6d} {a['tflop']:>6.1f} {spans(a)}")
    print()
    print(f"T4 100% and 25%: the FLOPs at the T4's peak for the run's precision (fp16 on tensor cores "
          f"{T4_PEAK['fp16'] / 1e12:.0f} TFLOP/s, fp32")
    print(f"{T4_PEAK['fp32'] / 1e12:.1f}) and at {T4_FRACTION:.0%} of it, an assumption for models this small. "
          f"host: a floor from the ATen operators per step")
    print(f"(counted here) at {1e6 * res['host_s_per_op']:.1f} us each, the cost implied by preset=cpu-demo's "
          f"{H100_CPU_DEMO_STEPS_PER_S} steps/s measured on one H100 (README);")
    print("Colab's two vCPUs are likely slower. T4 est.: the larger of the two, training steps only (no sampling, "
          "evaluation or install).")
    return res


COMMANDS = {"samplers": bench_samplers, "spacing": bench_spacing, "train": bench_train, "data": bench_data,
            "colab": bench_colab, "quality": quality.main, "prepare": bench_prepare}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m tld.bench {{{'|'.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
