"""What every checker shares: ``CheckError``, calling the learner's function, comparing tensors, the ✓ line."""

from __future__ import annotations

import torch


class CheckError(AssertionError):
    """Raised by a ``check_*`` function: says what differs and how to fix it."""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _call(task: str, fn, case: str, *args, **kwargs):
    """Call the learner's function, turning a stub or a crash into a readable CheckError."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise CheckError(f"check_{task}: your function is still the stub ({e}). Replace the "
                         f"`raise NotImplementedError` line with your code, then run the check again.") from None
    except Exception as e:
        raise CheckError(f"check_{task}: your function raised {type(e).__name__}: {e}\n  on {case}") from e


def _compare(task: str, got, expected: torch.Tensor, case: str, atol: float = 1e-5, rtol: float = 1e-5,
             hint=None) -> float:
    """Shape, finiteness and values of ``got`` against ``expected``; returns the max abs error."""
    def fail(what):
        extra = hint(got, expected) if hint is not None and torch.is_tensor(got) else None
        raise CheckError(f"check_{task}: {what}\n  on {case}" + (f"\n  hint: {extra}" if extra else ""))

    if not torch.is_tensor(got):
        raise CheckError(f"check_{task}: your function returned {type(got).__name__}, expected a tensor of "
                         f"shape {tuple(expected.shape)}\n  on {case}")
    if tuple(got.shape) != tuple(expected.shape):
        fail(f"wrong shape: got {tuple(got.shape)}, expected {tuple(expected.shape)}")
    got_f, exp_f = got.detach().double(), expected.detach().double()
    if not torch.isfinite(got_f).all():
        idx = tuple(int(i) for i in (~torch.isfinite(got_f)).nonzero()[0])
        fail(f"non-finite value {got_f[idx].item()} at index {idx} (expected {exp_f[idx].item():.6g})")
    err = (got_f - exp_f).abs()
    bad = err > atol + rtol * exp_f.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        fail(f"wrong values: max abs error {err.max().item():.3g} at index {idx} (got {got_f[idx].item():.6g}, "
             f"expected {exp_f[idx].item():.6g}); {int(bad.sum())} of {bad.numel()} values differ")
    return err.max().item()


def _ok(task: str, n_cases: int, against: str, max_err: float) -> None:
    print(f"✓ check_{task}: {n_cases} cases match {against} (max abs error {max_err:.1e})")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def _scalar(task: str, value, case: str) -> torch.Tensor:
    """A learner's number (float, int or one-element tensor) as a 0-d float64 tensor, or a CheckError."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.detach().double().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    what = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
    raise CheckError(f"check_{task}: your function returned {what}, expected one number (a float)\n  on {case}")


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])
