"""What every checker shares: ``CheckError``, graded hints, calling the learner's function, comparing tensors.

Graded hints. A checker's first failure says what is wrong in concepts: the property the answer
violates, on the smallest case that shows it (cases run smallest first), with the shapes and the
largest error. A hint function (``hint=`` of ``_compare``) returns a concept (a string) or a pair
``(concept, code)``; the code-level half is printed only when the learner asks for it,
``check_x(fn, hint=2)``, or after ``CODE_HINTS_AFTER`` failures of the same checker in a row.
No hint prints the answer: ``tests/test_course.py`` runs every checker on its stub and on a
plausible wrong answer at every level and fails if a line of the solution shows up.
"""

from __future__ import annotations

import contextvars
import functools

import torch


class CheckError(AssertionError):
    """Raised by a ``check_*`` function: says what differs and how to fix it."""


CODE_HINTS_AFTER = 3                 # failures in a row of one checker before its code-level hints show
FAILURES: dict[str, int] = {}        # task -> failures in a row (reset when the check passes)
_LEVEL = contextvars.ContextVar("hint_level", default=1)


def checker(task: str):
    """Make ``check_<task>(fn)`` accept ``hint=`` (1: concepts, 2: code-level too) and count its failures."""
    def wrap(body):
        @functools.wraps(body)
        def check(fn, hint: int | None = None) -> None:
            if hint is not None and hint not in (1, 2):
                raise ValueError(f"check_{task}: hint={hint!r}; expected 1 (concepts) or 2 (code-level hints)")
            level = hint if hint is not None else (2 if FAILURES.get(task, 0) + 1 >= CODE_HINTS_AFTER else 1)
            token = _LEVEL.set(level)
            try:
                body(fn)
            except CheckError:
                FAILURES[task] = FAILURES.get(task, 0) + 1
                raise
            finally:
                _LEVEL.reset(token)
            FAILURES[task] = 0
        return check
    return wrap


def _hint_text(task: str, extra) -> str:
    """The hint lines of a failure: the concept always; the code-level half at level 2, else how to ask."""
    if not extra:
        return ""
    concept, code = (extra, None) if isinstance(extra, str) else extra
    text = f"\n  hint: {concept}" if concept else ""
    if code:
        text += (f"\n  code hint: {code}" if _LEVEL.get() >= 2
                 else f"\n  (a code-level hint: check_{task}(your_function, hint=2))")
    return text


def _fail(task: str, what: str, case: str, hint=None):
    """Raise the CheckError of a failed case: what differs, on which case, and the graded hint."""
    raise CheckError(f"check_{task}: {what}\n  on {case}" + _hint_text(task, hint))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _call(task: str, fn, case: str, *args, **kwargs):
    """Call the learner's function, turning a stub or a crash into a readable CheckError."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise CheckError(f"check_{task}: your function is still the stub ({e}). Replace the "
                         f"`raise NotImplementedError` line with your code, then run the check again.") from None
    except CheckError:
        raise
    except Exception as e:
        raise CheckError(f"check_{task}: your function raised {type(e).__name__}: {e}\n  on {case}") from e


def _compare(task: str, got, expected: torch.Tensor, case: str, atol: float = 1e-5, rtol: float = 1e-5,
             hint=None) -> float:
    """Shape, finiteness and values of ``got`` against ``expected``; returns the max abs error."""
    def fail(what):
        extra = hint(got, expected) if hint is not None and torch.is_tensor(got) else None
        _fail(task, what, case, extra)

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
