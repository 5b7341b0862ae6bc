"""Side-by-side benchmarks against diffusers, printing tables (measured in one run).

    python -m tld.bench samplers     # accuracy vs the exact ODE solution, and per-step overhead
    python -m tld.bench spacing      # DPM-Solver++(2M) error for each step spacing (the default's evidence)

Each subcommand is a function in ``COMMANDS``; add one (e.g. ``train``) by writing ``bench_train(argv)``
and registering it there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .diffusion import get_schedule
from .gmm import GMM, rms_error
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


COMMANDS = {"samplers": bench_samplers, "spacing": bench_spacing}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m tld.bench {{{'|'.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
