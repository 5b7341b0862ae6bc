"""Checkers of lesson 06, the training loop: the EMA, the learning-rate schedule, the CFG training loss."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ... import diffusion
from ...models import create
from ...optim import ema_update, lr_at
from .common import CheckError, _call, _close, _compare, _fail, _flat, _gen, _ok, _scalar, checker


@checker("ema_update")
def check_ema_update(fn) -> None:
    """``fn(ema, model, decay)``: in place, ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    g = _gen(12)
    cases = [(0.9, 4, 8), (0.999, 3, 5), (0.0, 2, 6), (1.0, 5, 3)]
    worst = 0.0
    for decay, d_in, d_out in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            model = nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.Linear(d_out, 2))
            ema = copy.deepcopy(model).requires_grad_(False)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))  # the model has moved away from its average
        before, weights = _flat(ema), _flat(model)
        expected = copy.deepcopy(ema)
        ema_update(expected, model, decay)
        case = (f"decay {decay}; ema and model: Linear({d_in}, {d_out}) -> LayerNorm({d_out}) -> Linear({d_out}, 2), "
                f"{len(list(model.parameters()))} parameter tensors, {weights.numel()} numbers")
        _call("ema_update", fn, case, ema, model, decay)
        if not torch.equal(_flat(model), weights):
            _fail("ema_update", "your function changed the model's weights; only the EMA copy should change", case)

        def hint(got, exp, before=before, weights=weights, decay=decay):
            if _close(got, before, 1e-7):
                return ("the EMA did not change: update its parameters in place (p_ema.mul_(decay).add_(p, "
                        "alpha=1 - decay) or p_ema.lerp_(p, 1 - decay)); assigning to the loop variable changes nothing")
            if _close(got, (1 - decay) * before + decay * weights):
                return ("decay weighs the old average: ema = decay * ema + (1 - decay) * model, so a decay near 1 "
                        "is a long, slow average")
            if _close(got, weights):
                return "that copies the model; blend it in with weight (1 - decay)"
            return ("every EMA parameter moves a fraction (1 - decay) of the way toward the model's, in place; "
                    "decay 0 copies the model, decay 1 leaves the EMA as it was",
                    "zip(ema.parameters(), model.parameters()) under torch.no_grad(), and an in-place update "
                    "(mul_ / add_ or lerp_) of the EMA tensor")

        worst = max(worst, _compare("ema_update", _flat(ema), _flat(expected), case, atol=1e-6, rtol=1e-6,
                                    hint=hint))
    _ok("ema_update", len(cases), "tld.optim.ema_update", worst)


def _lr_variant(step, lr, warmup, max_steps, ratio, plus_one=True, floor=True, clamp=True, from_warmup=True):
    """tld.optim.lr_at's formula with one piece switched off: the usual mistakes, for hints."""
    if step < warmup:
        return lr * (step + plus_one) / warmup
    start = warmup if from_warmup else 0
    progress = (step - start) / max(1, max_steps - start)
    progress = min(1.0, progress) if clamp else progress
    r = ratio if floor else 0.0
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


@checker("lr_at")
def check_lr_at(fn) -> None:
    """``fn(step, lr, warmup_steps, max_steps, min_lr_ratio) -> float``: linear warmup, then cosine decay."""
    cases = [(1e-3, 10, 100, 0.1), (2e-3, 0, 50, 0.0), (5e-4, 25, 40, 0.5), (1.0, 1, 7, 0.1)]
    worst = 0.0
    for lr, warmup, max_steps, ratio in cases:
        steps = range(max_steps + 4)  # a few steps past the end: the rate holds at its floor
        case = (f"lr {lr}, warmup_steps {warmup}, max_steps {max_steps}, min_lr_ratio {ratio}; "
                f"steps 0..{max_steps + 3} (the index below is the step)")
        got = torch.stack([_scalar("lr_at", _call("lr_at", fn, case, s, lr, warmup, max_steps, ratio),
                                   f"{case}, step {s}") for s in steps])
        expected = torch.tensor([lr_at(s, lr=lr, warmup_steps=warmup, max_steps=max_steps, schedule="cosine",
                                       min_lr_ratio=ratio) for s in steps], dtype=torch.float64)

        def hint(got, exp, args=(lr, warmup, max_steps, ratio)):
            variants = [({"plus_one": False}, "count the current step in warmup, so step 0 already trains at "
                                              "lr / warmup_steps (yours gives it rate 0)"),
                        ({"floor": False}, "decay to lr * min_lr_ratio, not to 0: "
                                           "lr * (r + (1 - r) * 0.5 * (1 + cos(pi * progress)))"),
                        ({"clamp": False}, "after max_steps hold the final rate: progress = min(1, ...)"),
                        ({"from_warmup": False}, "the cosine starts where warmup ends: "
                                                 "progress = (step - warmup_steps) / (max_steps - warmup_steps)")]
            for kw, text in variants:
                if _close(got, torch.tensor([_lr_variant(s, *args, **kw) for s in range(len(got))],
                                            dtype=torch.float64), 1e-9):
                    return text
            return ("two pieces: a linear ramp that reaches lr at the end of warmup, then half a cosine from lr down "
                    "to lr * min_lr_ratio at max_steps, held there after it",
                    "the cosine's progress runs from 0 at warmup_steps to 1 at max_steps (clamp it); the ramp counts "
                    "the current step as done")

        worst = max(worst, _compare("lr_at", got, expected, case, atol=1e-12, rtol=1e-9, hint=hint))
    _ok("lr_at", len(cases), "tld.optim.lr_at", worst)


@checker("cfg_training_loss")
def check_cfg_training_loss(fn) -> None:
    """``fn(model, x0, labels, t, eps, drop, schedule) -> loss``: one step's v-loss, dropped labels -> null class.

    The loss of ``tld.train``'s step: labels where ``drop`` is True become the null class
    ``model.num_classes``; x_t = alpha_t x0 + sigma_t eps; the mean of (model(x_t, t, labels) - v)^2
    with v = alpha_t eps - sigma_t x0.
    """
    g = _gen(13)
    cases = [("vp-cosine", 4, "random"), ("vp-linear", 3, "all"), ("rectified", 5, "none")]
    worst = 0.0
    for name, b, which in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            model = create("uvit-course", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                           num_classes=5, conv_mlp=False).eval()
            with torch.no_grad():  # weights away from the init, so the label (and its dropout) matters
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
        schedule = diffusion.get_schedule(name)
        x0, eps = torch.randn(b, 3, 8, 8, generator=g), torch.randn(b, 3, 8, 8, generator=g)
        t = torch.rand(b, generator=g) * 0.9 + 0.05
        labels = torch.randint(0, 5, (b,), generator=g)
        drop = {"random": torch.arange(b) % 2 == 0, "all": torch.ones(b, dtype=torch.bool),
                "none": torch.zeros(b, dtype=torch.bool)}[which]
        case = (f"schedule {name!r}, x0 {(b, 3, 8, 8)}, labels {labels.tolist()}, drop {drop.tolist()}, "
                f"a tiny U-ViT with num_classes {model.num_classes}")
        cond = labels.clone()
        cond[drop] = model.num_classes
        x_t = diffusion.add_noise(x0, eps, t, schedule)
        with torch.no_grad():
            expected = diffusion.loss(model(x_t, t, cond), x0, eps, t, schedule, "v").mean()
        given = labels.clone()
        got = _call("cfg_training_loss", fn, case, model, x0, given, t, eps, drop, schedule)
        if not torch.equal(given, labels):
            _fail("cfg_training_loss", f"your function changed the labels it was given (now {given.tolist()}); "
                  f"the batch belongs to the data loader", case, ("work on a copy of the labels", "labels.clone()"))
        if torch.is_tensor(got) and not got.requires_grad:
            _fail("cfg_training_loss", "the loss carries no gradient (requires_grad is False), so backward() cannot "
                  "train the model", case, "do not compute it under torch.no_grad() and do not .detach() or .item() it")

        def hint(got, exp, x0=x0, eps=eps, t=t, labels=labels, drop=drop, x_t=x_t, schedule=schedule, model=model):
            a, s = schedule.alpha(t).view(-1, 1, 1, 1), schedule.sigma(t).view(-1, 1, 1, 1)
            with torch.no_grad():
                pred = model(x_t, t, torch.where(drop, model.num_classes, labels))
                if got.shape == (len(t),):
                    return "average over the batch: the loss is one number (.mean()), not one per example"
                if _close(got, (pred - eps).pow(2).mean(), 1e-6):
                    return "that is the eps loss; the target here is v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)"
                if _close(got, (pred - (a * x0 - s * eps)).pow(2).mean(), 1e-6):
                    return "eps and x0 are swapped in your v: v = alpha_t eps - sigma_t x0"
                if drop.any() and _close(got, diffusion.loss(model(x_t, t, labels), x0, eps, t, schedule, "v").mean(), 1e-6):
                    return "replace the label of every dropped example (drop True) by the null class, model.num_classes"
                if drop.any() and _close(got, diffusion.loss(model(x_t, t, torch.where(drop, 0, labels)), x0, eps, t,
                                                             schedule, "v").mean(), 1e-6):
                    return "the null class is model.num_classes (one past the real classes), not 0"
            return ("three parts: the dropped labels become the null class, the model sees x_t (lesson 01's noising) "
                    "with those labels, and the loss is the mean squared error against the v target",
                    "alpha_t and sigma_t need the shape [B, 1, 1, 1]; one .mean() over everything at the end")

        worst = max(worst, _compare("cfg_training_loss", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("cfg_training_loss", len(cases), "tld.diffusion.loss on tld.train's step (v target, null class)", worst)


def _model_with_grads(seed: int, scale: float):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        for p in model.parameters():
            p.grad = scale * torch.randn_like(p)
    return model


@checker("clip_grad_norm")
def check_clip_grad_norm(fn) -> None:
    """``fn(model, max_norm) -> total_norm``: in place, scale every gradient by min(1, max_norm / (norm + 1e-6)),
    where norm is the L2 norm of all gradients together; return that norm (``torch.nn.utils.clip_grad_norm_``)."""
    cases = [(0.01, 1.0), (1.0, 0.5), (3.0, 100.0)]
    worst = 0.0
    for i, (scale, max_norm) in enumerate(cases):
        model, expected_model = _model_with_grads(30 + i, scale), _model_with_grads(30 + i, scale)
        expected_norm = torch.nn.utils.clip_grad_norm_(expected_model.parameters(), max_norm)
        before = torch.cat([p.grad.flatten() for p in model.parameters()])
        case = (f"gradients of a Linear-LayerNorm-Linear with total norm {expected_norm.item():.4g}, max_norm {max_norm}"
                + (" (no clipping needed)" if expected_norm <= max_norm else ""))
        got_norm = _scalar("clip_grad_norm", _call("clip_grad_norm", fn, case, model, max_norm), case)

        def norm_hint(got, exp, before=before, i=i, scale=scale):
            if _close(got, before.pow(2).sum().double(), 1e-6):
                return "the norm is the square root of the sum of squares"
            per = torch.stack([p.grad.norm() for p in _model_with_grads(30 + i, scale).parameters()])
            if _close(got, per.sum().double(), 1e-6) or _close(got, per.max().double(), 1e-6):
                return "one norm over all the gradients together, as if they were one long vector"
            return "return the total norm measured before clipping"

        worst = max(worst, _compare("clip_grad_norm", got_norm, expected_norm.double(), case, atol=1e-6, rtol=1e-5,
                                    hint=norm_hint))
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        want = torch.cat([p.grad.flatten() for p in expected_model.parameters()])

        def grad_hint(got, exp, before=before, max_norm=max_norm):
            if _close(got, before, 1e-7):
                return "scale the gradients in place (p.grad), not a copy"
            if _close(got, before * max_norm / before.norm(), 1e-6):
                return "only shrink: when the norm is already below max_norm the gradients stay as they are"
            return ("every gradient is multiplied by the same factor, so the direction of the update is kept",
                    "factor = max_norm / (total_norm + 1e-6), capped at 1; p.grad.mul_(factor)")

        worst = max(worst, _compare("clip_grad_norm", got, want, case + " (the gradients after)", atol=1e-6, rtol=1e-5,
                                    hint=grad_hint))
    _ok("clip_grad_norm", len(cases), "torch.nn.utils.clip_grad_norm_", worst)


EMA_HALF_LIFE = (650, 750)   # decay 0.999: ln 2 / -ln 0.999 = 692.8 steps


@checker("ema_half_life")
def check_ema_half_life(fn) -> None:
    """``fn(decay) -> int``: the fewest EMA updates after which the starting weights count for at most half of
    the average (measure it: an EMA of a one-number model that starts at 1 while the model stays at 0)."""
    found = {}
    for decay in (0.5, 0.9, 0.99, 0.999):
        case = f"decay {decay}"
        expected = torch.tensor(float(math.ceil(math.log(0.5) / math.log(decay) - 1e-12)), dtype=torch.float64)

        def hint(got, exp, decay=decay):
            if _close(got, exp - 1, 1e-9):
                return "the fewest steps at which the share is <= 1/2: count the step that crosses it"
            if _close(got, torch.tensor(1 / (1 - decay)), 1e-6):
                return "1 / (1 - decay) is the EMA's mean age, not its half-life"
            return ("after n updates the starting weights have share decay^n: find the first n with share <= 1/2",
                    "loop calling ema_update on a 1-number model and count, or solve decay^n = 1/2 and round up")

        got = _scalar("ema_half_life", _call("ema_half_life", fn, case, decay), case)
        _compare("ema_half_life", got, expected, case, atol=0, rtol=0, hint=hint)
        found[decay] = int(got.item())
    if not EMA_HALF_LIFE[0] <= found[0.999] <= EMA_HALF_LIFE[1]:
        raise CheckError(f"check_ema_half_life: {found[0.999]} outside {EMA_HALF_LIFE}")
    _ok("ema_half_life", len(found), "decay^n <= 1/2", 0.0)
    print(f"  answer: half-lives {found}: decay 0.999 forgets half its start after {found[0.999]} steps, so a "
          f"1000-step run's EMA still remembers its initial noise")
