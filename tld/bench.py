"""Side-by-side benchmarks against diffusers, printing tables (measured in one run).

    python -m tld.bench samplers     # accuracy vs the exact ODE solution, and per-step overhead
    python -m tld.bench spacing      # DPM-Solver++(2M) error for each step spacing (the default's evidence)
    python -m tld.bench train        # training steps/s and memory: tld's DiT vs diffusers' DiTTransformer2DModel
    python -m tld.bench data         # Shapes rendering rate, against what a training step consumes

Each subcommand is a function in ``COMMANDS``; add one (e.g. ``train``) by writing ``bench_train(argv)``
and registering it there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .data import ShapesDataset
from .diffusion import get_schedule
from .gmm import GMM, rms_error
from .models import create
from .samplers import sample

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


COMMANDS = {"samplers": bench_samplers, "spacing": bench_spacing, "train": bench_train, "data": bench_data}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m tld.bench {{{'|'.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
