"""Checkers of lesson 04, U-ViT: the long-skip fusion and the time token."""

from __future__ import annotations

import torch

from ...blocks import Block, timestep_embedding
from ...models import create
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


@checker("skip_fusion")
def check_skip_fusion(fn) -> None:
    """``fn(x_deep, x_shallow, linear) -> tokens``: U-ViT's fusion Linear(concat([deep, shallow]))."""
    g = _gen(5)
    worst = 0.0
    dims = [(2, 5, 16), (1, 9, 32)]
    for b, n, d in dims:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            block = Block(d, num_heads=2, skip="concat").eval()
        x, skip = torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)
        case = f"x_deep and x_shallow of shape {(b, n, d)}, linear = Linear({2 * d}, {d})"
        with torch.no_grad():
            expected = block(x, skip)
            fused = _call("skip_fusion", fn, case, x, skip, block.skip_linear)
            if torch.is_tensor(fused) and fused.shape == x.shape:
                # run the rest of the library block on your fused tokens
                got = fused + block.attn(block.norm1(fused))
                got = got + block.mlp(block.norm2(got))
            else:
                got = fused
            lin = block.skip_linear

        def hint(got, exp, x=x, skip=skip, lin=lin, fused=fused):
            with torch.no_grad():
                if _close(fused, lin(torch.cat([skip, x], -1))):
                    return "concatenate deep first, then shallow: torch.cat([x_deep, x_shallow], dim=-1)"
                if _close(fused, x + lin(torch.cat([x, skip], -1))):
                    return "the fused tokens replace x_deep (U-ViT adds no residual around the skip Linear)"
                if _close(fused, x + skip):
                    return "that is the additive skip; U-ViT concatenates along channels and applies `linear`"
                if torch.is_tensor(fused) and fused.shape[-1] == 2 * x.shape[-1]:
                    return "after concatenating, apply `linear` to bring 2D channels back to D"
            return ("the fusion sees both token sets side by side in the channels (2D of them) and maps them back "
                    "to D", "torch.cat along dim=-1, then call `linear`")

        worst = max(worst, _compare("skip_fusion", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("skip_fusion", len(dims), "tld.blocks.Block(skip='concat')", worst)


@checker("timestep_embedding")
def check_timestep_embedding(fn) -> None:
    """``fn(t, dim) -> [B, dim]``: U-ViT's time token, the raw sinusoid of 1000 t, order [cos, sin]."""
    cases = [(torch.tensor([0.0, 0.25, 0.999]), 16), (torch.tensor([0.5]), 64), (torch.tensor([0.1, 0.9]), 8)]
    worst = 0.0
    for t, dim in cases:
        case = f"t = {[round(v, 4) for v in t.tolist()]}, dim {dim}"

        def hint(got, exp, t=t, dim=dim):
            half = dim // 2
            if _close(got, torch.cat([exp[:, half:], exp[:, :half]], 1)):
                return "order: cosines first, then sines, [cos, sin] (the guided-diffusion / U-ViT order)"
            if _close(got, timestep_embedding(t, dim, scale=1.0)):
                return "tld's t is in [0, 1]; embed the reference's integer step 1000 * t"
            return ("dim/2 frequencies, geometric from 1 down toward 1/10000, times the integer step 1000 t; "
                    "cosines first, then sines",
                    "an outer product of the times [B] with the frequencies [dim/2] gives the angles [B, dim/2]")

        got = _call("timestep_embedding", fn, case, t, dim)
        worst = max(worst, _compare("timestep_embedding", got, timestep_embedding(t, dim), case, atol=1e-4,
                                    rtol=1e-5, hint=hint))
    _ok("timestep_embedding", len(cases), "tld.blocks.timestep_embedding", worst)


def _tiny_uvit(seed: int, depth: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create("uvit-course", img_size=8, patch_size=2, embed_dim=16, depth=depth, num_heads=2,
                       num_classes=3, conv_mlp=False).eval()
        with torch.no_grad():  # trained-looking skip Linears, so the pairing matters
            for blk in model.out_blocks:
                blk.skip_linear.weight.normal_(std=0.3)
    return model


def _run_blocks(model, x, order="lifo", skips_on=True):
    skips = []
    for blk in model.in_blocks:
        x = blk(x)
        skips.append(x)
    x = model.mid_block(x)
    for blk in model.out_blocks:
        skip = skips.pop() if order == "lifo" else skips.pop(0)
        x = blk(x, skip if skips_on else torch.zeros_like(x))
    return x


@checker("run_blocks")
def check_run_blocks(fn) -> None:
    """``fn(model, x) -> tokens``: a U-ViT's transformer part on tokens x [B, L, D]: the in-blocks (keeping
    each one's output), the mid-block, then each out-block with its long skip, ``out_block(x, skip)``."""
    g = _gen(26)
    cases = [(1, 3), (2, 5), (2, 7)]
    worst = 0.0
    for b, depth in cases:
        model = _tiny_uvit(int(torch.randint(1000, (1,), generator=g)), depth)
        x = torch.randn(b, 18, 16, generator=g)
        case = (f"tokens {(b, 18, 16)}, a U-ViT of depth {depth} ({len(model.in_blocks)} in-blocks, a mid-block, "
                f"{len(model.out_blocks)} out-blocks)")
        with torch.no_grad():
            expected = _run_blocks(model, x)
            got = _call("run_blocks", fn, case, model, x)

        def hint(got, exp, model=model, x=x):
            with torch.no_grad():
                if _close(got, _run_blocks(model, x, order="fifo")):
                    return ("the skips pair up like a U-Net: the first out-block takes the LAST in-block's output "
                            "(the closest in depth), the last out-block the first: last in, first out")
                if _close(got, _run_blocks(model, x, skips_on=False)):
                    return "each out-block takes its skip as the second argument: out_block(x, skip)"
            return ("keep the output of every in-block; after the mid-block, out-block j fuses the output of in-block "
                    "n - 1 - j", "a Python list used as a stack: append after each in-block, pop before each out-block")

        worst = max(worst, _compare("run_blocks", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("run_blocks", len(cases), "U-ViT's block loop (tld.models.uvit.UViT.forward)", worst)


SKIP_SHARE = (0.05, 0.08)   # uvit-course: the long-skip Linears hold 6.4% of the parameters


@checker("skip_parameter_fraction")
def check_skip_parameter_fraction(fn) -> None:
    """``fn(model) -> float``: the fraction of a U-ViT's parameters (numbers) in its long-skip Linears."""
    found = None
    for depth in (3, 7, None):
        model = _tiny_uvit(0, depth) if depth else create("uvit-course")
        case = f"uvit-course, depth {depth}, embed_dim 16" if depth else "uvit-course at its defaults"
        total = sum(p.numel() for p in model.parameters())
        expected = torch.tensor(sum(p.numel() for blk in model.out_blocks for p in blk.skip_linear.parameters())
                                / total, dtype=torch.float64)

        def hint(got, exp, model=model, total=total):
            weights = sum(blk.skip_linear.weight.numel() for blk in model.out_blocks) / total
            if _close(got, torch.tensor(weights), 1e-6):
                return "count the skip Linears' biases too"
            return ("the skip Linear of every out-block, over every parameter of the model, counted in numbers",
                    "p.numel() summed over model.parameters(); each out-block has .skip_linear")

        got = _scalar("skip_parameter_fraction", _call("skip_parameter_fraction", fn, case, model), case)
        _compare("skip_parameter_fraction", got, expected, case, atol=1e-9, rtol=0, hint=hint)
        found = got.item()
    if not SKIP_SHARE[0] <= found <= SKIP_SHARE[1]:
        raise CheckError(f"check_skip_parameter_fraction: {found:.3f} outside {SKIP_SHARE}")
    _ok("skip_parameter_fraction", 3, "a parameter count of U-ViT's skip Linears", 0.0)
    print(f"  answer: the long skips cost {found:.1%} of uvit-course's parameters (a Linear(2D, D) in half the blocks)")
