"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

    python -m tld.course exercises            # write exercises/ from solutions/ (--check: only compare)
    python -m tld.course run --preset cpu     # run every lesson and solution with papermill into build/

``solutions/NN_topic.ipynb`` is the single source of the exercises. In its code cells the lines
between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become one ``raise NotImplementedError(...)``
at the indentation of the ``# BEGIN SOLUTION`` line; in markdown cells the lines between
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` are dropped. Outputs are cleared.

A learner checks a function with ``check_<task>(fn)``: it runs real cases against ``tld`` and,
when something differs, raises ``CheckError`` (an ``AssertionError``) saying what: the shape, the
largest error and where it is, and a hint for the usual mistakes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
PRESETS = ("smoke", "cpu", "colab")

# ---------------------------------------------------------------------------------------------
# Exercises from solutions
# ---------------------------------------------------------------------------------------------


def _task_name(lines: list[str], begin: int, indent: int) -> str | None:
    """The function a solution block sits in: the nearest `def` above it, less indented."""
    for line in reversed(lines[:begin]):
        m = re.match(r"(\s*)def (\w+)", line)
        if m and len(m.group(1)) < indent:
            return m.group(2)
    return None


def exercise_source(src: str, where: str = "cell") -> str:
    """Replace every ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block of code with a stub.

    The stub sits at the indentation of the ``# BEGIN SOLUTION`` line, so a block inside a
    function body stays valid Python. Unbalanced or nested markers are an error naming ``where``.
    """
    lines = src.split("\n")
    out, begin = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if begin is not None:
                raise ValueError(f"{where}, line {i + 1}: '{BEGIN}' inside another solution block "
                                 f"(opened at line {begin + 1}); close it with '{END}' first")
            begin = i
            indent = len(line) - len(line.lstrip())
            name = _task_name(lines, i, indent)
            what = f"write {name}" if name else "fill in this part"
            out.append(" " * indent + f'raise NotImplementedError("exercise: {what}")')
        elif stripped.startswith(END):
            if begin is None:
                raise ValueError(f"{where}, line {i + 1}: '{END}' without a '{BEGIN}' before it")
            begin = None
        elif begin is None:
            out.append(line)
    if begin is not None:
        raise ValueError(f"{where}, line {begin + 1}: '{BEGIN}' is never closed with '{END}'")
    return "\n".join(out)


def _markdown_exercise(src: str, where: str) -> str:
    out, inside = [], False
    for i, line in enumerate(src.split("\n")):
        if line.strip() == MD_BEGIN:
            if inside:
                raise ValueError(f"{where}, line {i + 1}: nested '{MD_BEGIN}'")
            inside = True
        elif line.strip() == MD_END:
            if not inside:
                raise ValueError(f"{where}, line {i + 1}: '{MD_END}' without '{MD_BEGIN}'")
            inside = False
        elif not inside:
            out.append(line.replace("/blob/main/solutions/", "/blob/main/exercises/"))
    if inside:
        raise ValueError(f"{where}: '{MD_BEGIN}' is never closed")
    return "\n".join(out)


def exercise_notebook(nb, name: str = "notebook"):
    """A copy of solution notebook ``nb`` (nbformat) with the solutions stubbed and outputs cleared."""
    import copy

    nb = copy.deepcopy(nb)
    n_blocks = 0
    for k, cell in enumerate(nb.cells):
        where = f"{name}, cell {k}"
        if cell.cell_type == "code":
            n_blocks += sum(line.strip().startswith(BEGIN) for line in cell.source.split("\n"))
            cell.source = exercise_source(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown":
            cell.source = _markdown_exercise(cell.source, where)
    if not n_blocks:
        raise ValueError(f"{name} has no '{BEGIN}' block: nothing to turn into an exercise")
    return nb


def write_exercises(solutions_dir=REPO / "solutions", exercises_dir=REPO / "exercises",
                    check: bool = False) -> list[Path]:
    """Write ``exercises/NN_topic.ipynb`` for every ``solutions/NN_topic.ipynb``.

    With ``check=True`` write nothing and return the exercises that are missing or differ.
    """
    import nbformat

    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    paths = sorted(solutions_dir.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no solution notebooks (NN_topic.ipynb) in {solutions_dir}")
    changed = []
    for path in paths:
        nb = exercise_notebook(nbformat.read(path, as_version=4), path.name)
        text = nbformat.writes(nb) + "\n"
        out = exercises_dir / path.name
        if out.is_file() and out.read_text() == text:
            continue
        changed.append(out)
        if not check:
            exercises_dir.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    return changed


# ---------------------------------------------------------------------------------------------
# Whole-course runs
# ---------------------------------------------------------------------------------------------


def lessons(repo=REPO) -> list[Path]:
    """Every lesson notebook, then every solution notebook, in course order."""
    repo = Path(repo)
    return sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
        (repo / "solutions").glob("[0-9][0-9]_*.ipynb"))


def run_course(preset: str = "cpu", paths=None, out_dir=REPO / "build", timeout: int = 600,
               print_table: bool = True) -> list[dict]:
    """Execute each notebook with papermill into ``out_dir/<folder>/<name>``; return one row each.

    ``preset`` is passed only to notebooks whose parameters cell defines ``preset``. A failing
    notebook is recorded (passed False, with its error) and the run goes on.
    """
    import papermill

    paths = lessons() if paths is None else [Path(p) for p in paths]
    out_dir = Path(out_dir)
    rows = []
    for path in paths:
        params = papermill.inspect_notebook(str(path))
        parameters = {"preset": preset} if "preset" in params else {}
        out = out_dir / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        error = None
        try:
            papermill.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                                       progress_bar=False, kernel_name="python3", execution_timeout=timeout)
        except Exception as e:  # a failed lesson is a row of the table, not the end of the run
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        rows.append({"lesson": f"{path.parent.name}/{path.name}", "seconds": round(time.perf_counter() - t0, 1),
                     "passed": error is None, "preset": parameters.get("preset", "-"), "error": error,
                     "output": str(out)})
        if print_table:
            print(f"{rows[-1]['lesson']:<48} {rows[-1]['seconds']:>8.1f}  {'yes' if error is None else 'NO'}",
                  flush=True)
    if print_table:
        print()
        print(format_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "course.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table: lesson | seconds | passed (with the error of each failure below it)."""
    lines = ["| lesson | seconds | passed |", "|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['lesson']} | {r['seconds']:.1f} | {'yes' if r['passed'] else 'NO'} |")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"| **total** ({sum(r['passed'] for r in rows)}/{len(rows)} passed) | {total:.1f} | |")
    for r in rows:
        if not r["passed"]:
            lines.append(f"\n{r['lesson']}: {r['error']}  (see {r['output']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Learner checkers
# ---------------------------------------------------------------------------------------------


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


# --- lesson 01: forward diffusion ---------------------------------------------------------------

def check_add_noise(fn) -> None:
    """``fn(x0, eps, t, schedule) -> x_t`` with x0, eps [B, C, H, W], t [B]: alpha_t x0 + sigma_t eps."""
    from tld.diffusion import add_noise, get_schedule

    g = _gen(1)
    worst = 0.0
    cases = [("vp-linear", (4, 3, 8, 8)), ("vp-cosine", (3, 1, 5, 7)), ("rectified", (2, 4, 4, 4))]
    for name, shape in cases:
        schedule = get_schedule(name)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.rand(shape[0], generator=g) * 0.98 + 0.01
        case = f"schedule {name!r}, x0 {tuple(shape)}, t {[round(v, 3) for v in t.tolist()]}"

        def hint(got, exp, x0=x0, eps=eps, t=t, schedule=schedule):
            a, s = schedule.alpha(t).view(-1, 1, 1, 1), schedule.sigma(t).view(-1, 1, 1, 1)
            if _close(got, a**2 * x0 + s**2 * eps):
                return "alpha(t) and sigma(t) are already the square roots: do not square them"
            if _close(got, s * x0 + a * eps):
                return "alpha_t multiplies the image x0 and sigma_t the noise eps, not the other way round"
            if _close(got, (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps):
                return "that is the rectified schedule; ask the schedule: schedule.alpha(t), schedule.sigma(t)"
            return ("t has one value per image: reshape alpha_t, sigma_t from [B] to [B, 1, 1, 1] "
                    "so they broadcast over C, H, W")

        got = _call("add_noise", fn, case, x0, eps, t, schedule)
        worst = max(worst, _compare("add_noise", got, add_noise(x0, eps, t, schedule), case, hint=hint))
    _ok("add_noise", len(cases), "tld.diffusion.add_noise", worst)


def check_log_snr(fn) -> None:
    """``fn(t, schedule) -> lambda_t = log(alpha_t^2 / sigma_t^2)`` on a tensor of times."""
    from tld.diffusion import get_schedule

    worst = 0.0
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    names = ("vp-linear", "vp-cosine", "rectified")
    for name in names:
        schedule = get_schedule(name)
        case = f"schedule {name!r}, t = {t.tolist()} (float64)"
        expected = schedule.log_snr(t)

        def hint(got, exp):
            if _close(got, exp / 2):
                return ("that is log(alpha/sigma), half of lambda_t (DPM-Solver's convention); "
                        "the log-SNR is log(alpha^2 / sigma^2)")
            if _close(got, torch.exp(exp)):
                return "that is the SNR itself; take its log"
            if _close(got, -exp):
                return "sign: the SNR is alpha^2 / sigma^2 (signal over noise), falling with t"
            return "lambda_t = log(alpha_t^2) - log(sigma_t^2), with alpha_t, sigma_t from the schedule"

        got = _call("log_snr", fn, case, t, schedule)
        worst = max(worst, _compare("log_snr", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint))
    _ok("log_snr", len(names), "Schedule.log_snr", worst)


# --- lesson 02: patch embedding ------------------------------------------------------------------

def _same_values_per_token(got: torch.Tensor, exp: torch.Tensor) -> bool:
    return got.shape == exp.shape and torch.allclose(got.sort(-1).values, exp.sort(-1).values)


def check_patchify(fn) -> None:
    """``fn(x, patch_size) -> tokens``: [B, C, H, W] -> [B, (H/p)(W/p), p*p*C], layout (p, p, C)."""
    from tld.patch import patchify

    g = _gen(2)
    cases = [(2, 3, 8, 8, 2), (1, 4, 12, 8, 4), (3, 1, 6, 6, 3), (1, 3, 4, 4, 1)]
    worst = 0.0
    for b, c, h, w, p in cases:
        x = torch.randn(b, c, h, w, generator=g)
        case = f"x of shape {(b, c, h, w)}, patch_size {p}"

        def hint(got, exp, p=p, c=c):
            if _same_values_per_token(got, exp):
                return (f"each token holds the right values in the wrong order: tld lays a token out as "
                        f"(p, p, C) = ({p}, {p}, {c}), the C channels of one pixel together, pixels row by row")
            if got.shape == exp.shape and torch.allclose(got.flatten().sort().values, exp.flatten().sort().values):
                return "the right values, but tokens in the wrong order: walk the patch grid row by row (h, then w)"
            return None

        got = _call("patchify", fn, case, x, p)
        worst = max(worst, _compare("patchify", got, patchify(x, p), case, atol=0, rtol=0, hint=hint))
    _ok("patchify", len(cases), "tld.patch.patchify", worst)


def check_unpatchify(fn) -> None:
    """``fn(tokens, patch_size, channels) -> images``: the inverse of patchify on a square grid."""
    from tld.patch import patchify, unpatchify

    g = _gen(3)
    cases = [(2, 3, 8, 2), (1, 4, 12, 4), (3, 1, 6, 3)]
    worst = 0.0
    for b, c, s, p in cases:
        x = torch.randn(b, c, s, s, generator=g)
        tokens = patchify(x, p)
        case = f"tokens of shape {tuple(tokens.shape)} (from images {(b, c, s, s)}), patch_size {p}, channels {c}"

        def hint(got, exp):
            if got.shape == exp.shape and torch.allclose(got.flatten().sort().values, exp.flatten().sort().values):
                return ("the right values in the wrong places: undo patchify's steps in reverse order, "
                        "reading each token as (p, p, C)")
            return None

        got = _call("unpatchify", fn, case, tokens, p, c)
        worst = max(worst, _compare("unpatchify", got, unpatchify(tokens, p, c), case, atol=0, rtol=0, hint=hint))
    _ok("unpatchify", len(cases), "tld.patch.unpatchify (and it inverts patchify)", worst)


def check_sincos_2d(fn) -> None:
    """``fn(dim, grid) -> [grid*grid, dim]``: fixed 2-D sin-cos position embedding (MAE / DiT)."""
    from tld.patch import sincos_2d

    cases = [(8, 2), (16, 4), (64, 8)]
    worst = 0.0
    for dim, grid in cases:
        case = f"dim {dim}, grid {grid}x{grid}"

        def hint(got, exp, dim=dim):
            h = dim // 2
            if _close(got, torch.cat([exp[:, h:], exp[:, :h]], 1)):
                return "x and y are swapped: the first half of the channels encodes x (the column), the second y (the row)"
            q = dim // 4
            swap = torch.cat([exp[:, q:h], exp[:, :q], exp[:, h + q:], exp[:, h:h + q]], 1)
            if _close(got, swap):
                return "in each half put the sines first, then the cosines: [sin, cos]"
            return ("per axis: omega_i = 1 / 10000^(i / (D/4)) for i < D/4, then [sin(pos * omega), "
                    "cos(pos * omega)]; tokens run row-major like patchify")

        got = _call("sincos_2d", fn, case, dim, grid)
        worst = max(worst, _compare("sincos_2d", got, sincos_2d(dim, grid), case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("sincos_2d", len(cases), "tld.patch.sincos_2d", worst)


# --- lesson 03: attention --------------------------------------------------------------------------

def check_attention(fn) -> None:
    """``fn(q, k, v) -> softmax(q k^T / sqrt(d)) v`` on [B, H, N, d] (keys may differ in number: M)."""
    from tld.blocks import attention

    g = _gen(4)
    cases = [(2, 4, 10, 16, 10), (1, 2, 7, 8, 5), (3, 1, 4, 32, 9)]
    worst = 0.0
    for b, h, n, d, m in cases:
        q, k, v = (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
                   torch.randn(b, h, m, d, generator=g))
        case = f"q {(b, h, n, d)}, k and v {(b, h, m, d)}"

        def hint(got, exp, q=q, k=k, v=v, d=d):
            s = q @ k.transpose(-2, -1)
            if _close(got, s.softmax(-1) @ v):
                return "scale the scores by 1 / sqrt(d) before the softmax (Vaswani et al. 2017, eq. 1)"
            if _close(got, (s / d).softmax(-1) @ v):
                return "divide by sqrt(d), not by d"
            if got.shape == exp.shape and _close(got, (s / math.sqrt(d)).softmax(-2) @ v):
                return "softmax over the keys (the last dimension), so each query's weights sum to 1"
            return None

        got = _call("attention", fn, case, q, k, v)
        expected = attention(q, k, v, backend="math")
        worst = max(worst, _compare("attention", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("attention", len(cases), "tld.blocks.attention (and F.scaled_dot_product_attention)", worst)


def check_split_heads(fn) -> None:
    """``fn(x, num_heads) -> [B, H, N, D/H]``: cut the channels of tokens [B, N, D] into H heads."""
    from tld.blocks import Attention

    g = _gen(11)
    cases = [(2, 5, 16, 4), (1, 7, 12, 3), (3, 4, 8, 1)]
    worst = 0.0
    for b, n, d, h in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            attn = Attention(d, h)
        x = torch.randn(b, n, d, generator=g)
        case = f"x {(b, n, d)}, num_heads {h}"
        with torch.no_grad():
            q_lib = attn.qkv_heads(x)[0]
            q_tokens = attn.qkv(x)[..., :d]  # the query third of the fused projection, [B, N, D]

        def hint(got, exp, q_tokens=q_tokens, b=b, n=n, d=d, h=h):
            if _close(got, q_tokens.reshape(b, h, n, d // h)):
                return ("a reshape straight to [B, H, N, d] mixes tokens across heads: reshape to "
                        "[B, N, H, d] first, then transpose(1, 2)")
            return "x.reshape(B, N, H, D // H).transpose(1, 2): each head gets a contiguous slice of channels"

        got = _call("split_heads", fn, case, q_tokens, h)
        worst = max(worst, _compare("split_heads", got, q_lib, case, atol=1e-6, rtol=1e-6, hint=hint))
    _ok("split_heads", len(cases), "tld.blocks.Attention.qkv_heads", worst)


# --- lesson 04: U-ViT long skips -------------------------------------------------------------------

def check_skip_fusion(fn) -> None:
    """``fn(x_deep, x_shallow, linear) -> tokens``: U-ViT's fusion Linear(concat([deep, shallow]))."""
    from tld.blocks import Block

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
            return "concatenate along the channel dimension (dim=-1), then apply `linear`"

        worst = max(worst, _compare("skip_fusion", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("skip_fusion", len(dims), "tld.blocks.Block(skip='concat')", worst)


def check_timestep_embedding(fn) -> None:
    """``fn(t, dim) -> [B, dim]``: U-ViT's time token, the raw sinusoid of 1000 t, order [cos, sin]."""
    from tld.blocks import timestep_embedding

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
            return ("freqs_i = exp(-log(10000) * i / (dim/2)) for i < dim/2; "
                    "args = 1000 * t[:, None] * freqs[None]; then [cos(args), sin(args)]")

        got = _call("timestep_embedding", fn, case, t, dim)
        worst = max(worst, _compare("timestep_embedding", got, timestep_embedding(t, dim), case, atol=1e-4,
                                    rtol=1e-5, hint=hint))
    _ok("timestep_embedding", len(cases), "tld.blocks.timestep_embedding", worst)


# --- lesson 05: adaLN-Zero --------------------------------------------------------------------------

def check_modulate(fn) -> None:
    """``fn(x, shift, scale) -> x * (1 + scale) + shift`` with x [B, N, D], shift/scale [B, D]."""
    from tld.blocks import modulate

    g = _gen(6)
    cases = [(2, 5, 8), (3, 4, 6), (1, 7, 16)]  # N != B, so a missing unsqueeze shows
    worst = 0.0
    for b, n, d in cases:
        x, shift, scale = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
        case = f"x {(b, n, d)}, shift and scale {(b, d)}"
        formula = x * (1 + scale[:, None]) + shift[:, None]

        def hint(got, exp, x=x, shift=shift, scale=scale):
            if _close(got, x * scale[:, None] + shift[:, None]):
                return "use (1 + scale): a zero scale must leave x unchanged, so zero-init starts as a plain LayerNorm"
            if _close(got, (x + shift[:, None]) * (1 + scale[:, None])):
                return "scale first, then shift: x * (1 + scale) + shift"
            return "shift and scale are one vector per sample: unsqueeze(1) so they broadcast over the N tokens"

        got = _call("modulate", fn, case, x, shift, scale)
        worst = max(worst, _compare("modulate", got, formula, case, hint=hint))
        worst = max(worst, _compare("modulate", got, modulate(x, shift, scale), case))
    _ok("modulate", len(cases), "x * (1 + scale) + shift and tld.blocks.modulate", worst)


def check_gate(fn) -> None:
    """``fn(x, gate, branch) -> x + gate * branch`` with x, branch [B, N, D] and gate [B, D].

    Checked inside a DiT block: your gate replaces both residual gates of
    ``tld.blocks.AdaLNZeroBlock`` (with a non-zero, random modulation).
    """
    from tld.blocks import AdaLNZeroBlock, modulate

    g = _gen(7)
    cases = [(2, 5, 16), (3, 4, 8)]
    worst = 0.0
    for b, n, d in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            block = AdaLNZeroBlock(d, num_heads=2).eval()
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)  # not zero: gates matter
        x, c = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)
        case = f"x {(b, n, d)}, gate {(b, d)}, inside AdaLNZeroBlock({d})"
        with torch.no_grad():
            expected = block(x, c)
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=-1)
            branch = block.attn(modulate(block.norm1(x), sh1, sc1))
            h = _call("gate", fn, case, x, g1, branch)
            got = h
            if torch.is_tensor(h) and h.shape == x.shape:
                got = _call("gate", fn, case, h, g2, block.mlp(modulate(block.norm2(h), sh2, sc2)))

        def hint(got, exp, x=x, g1=g1, branch=branch, h=h):
            if _close(h, g1[:, None] * branch):
                return "keep the residual: x + gate * branch (a zero gate must give back x: the identity)"
            if _close(h, x + branch):
                return "multiply the branch by the gate before adding it"
            return "gate is one vector per sample: gate.unsqueeze(1) broadcasts it over the N tokens"

        worst = max(worst, _compare("gate", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("gate", len(cases), "x + gate * branch inside tld.blocks.AdaLNZeroBlock", worst)


# --- lesson 07: samplers ------------------------------------------------------------------------------

def _grid_case(name: str, ts):
    """alpha, sigma and lambda = log(alpha / sigma) (half the log-SNR) as floats at times ts."""
    from tld.diffusion import get_schedule

    s = get_schedule(name)
    t = torch.tensor(ts, dtype=torch.float64)
    return s.alpha(t).tolist(), s.sigma(t).tolist(), (0.5 * s.log_snr(t)).tolist()


def check_ddim_step(fn) -> None:
    """``fn(x_t, eps_pred, alpha_t, sigma_t, alpha_s, sigma_s) -> x_s``: one deterministic DDIM step t -> s."""
    from tld.samplers import ddim_step

    g = _gen(8)
    cases = [("vp-linear", (0.8, 0.6)), ("vp-cosine", (0.5, 0.2)), ("rectified", (0.9, 0.7))]
    worst = 0.0
    for name, ts in cases:
        (a_t, a_s), (s_t, s_s), _ = _grid_case(name, ts)
        x, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                        dtype=torch.float64)
        x0 = (x - s_t * eps) / a_t
        case = f"schedule {name!r}, t {ts[0]} -> s {ts[1]}: alpha_t {a_t:.4f}, sigma_t {s_t:.4f}, alpha_s {a_s:.4f}, sigma_s {s_s:.4f}"

        def hint(got, exp, x=x, eps=eps, a_s=a_s, s_s=s_s):
            if _close(got, a_s * x + s_s * eps):
                return "first predict the clean image: x0_pred = (x_t - sigma_t * eps_pred) / alpha_t"
            return "x_s = alpha_s * x0_pred + sigma_s * eps_pred (Song et al. 2021, eq. 12 with sigma = 0)"

        got = _call("ddim_step", fn, case, x, eps, a_t, s_t, a_s, s_s)
        expected = ddim_step(x, x0, eps, a_s, s_s)
        worst = max(worst, _compare("ddim_step", got, expected, case, atol=1e-8, rtol=1e-8, hint=hint))
    _ok("ddim_step", len(cases), "tld.samplers.ddim_step", worst)


def check_dpm_solver_2m_step(fn) -> None:
    """``fn(x_t, x0_pred, x0_prev, lambda_prev, lambda_t, lambda_s, alpha_s, sigma_s, sigma_t) -> x_s``.

    One DPM-Solver++(2M) step t -> s (Lu et al. 2022b, Algorithm 2), lambda = log(alpha / sigma):
    h = lambda_s - lambda_t, r = (lambda_t - lambda_prev) / h,
    D = (1 + 1/(2r)) x0_pred - x0_prev / (2r), x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D.
    """
    from tld.samplers import dpm_solver_pp_step

    g = _gen(9)
    cases = [("vp-cosine", (0.7, 0.6, 0.45)), ("vp-linear", (0.5, 0.4, 0.2)), ("rectified", (0.9, 0.6, 0.5))]
    worst = 0.0
    for name, ts in cases:
        (_, _, a_s), (_, s_t, s_s), (l_p, l_t, l_s) = _grid_case(name, ts)
        shape = (2, 3, 4, 4)
        x, m0, m1 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
        h, r = l_s - l_t, (l_t - l_p) / (l_s - l_t)
        d = (1 + 1 / (2 * r)) * m0 - m1 / (2 * r)
        formula = (s_s / s_t) * x - a_s * math.expm1(-h) * d
        case = (f"schedule {name!r}, times prev {ts[0]}, t {ts[1]}, s {ts[2]}: lambda {l_p:.4f}, {l_t:.4f}, "
                f"{l_s:.4f}; h {h:.4f}, r {r:.4f}")

        def hint(got, exp, x=x, m0=m0, m1=m1, h=h, r=r, s_t=s_t, s_s=s_s, a_s=a_s):
            first = (s_s / s_t) * x - a_s * math.expm1(-h) * m0
            if _close(got, first):
                return "that is the first-order step (DDIM); use D = (1 + 1/(2r)) x0_pred - x0_prev / (2r)"
            d_inv = (1 + r / 2) * m0 - r / 2 * m1
            if _close(got, (s_s / s_t) * x - a_s * math.expm1(-h) * d_inv):
                return "r is the previous step over this one: r = h_prev / h = (lambda_t - lambda_prev) / h"
            if _close(got, (s_s / s_t) * x + a_s * math.expm1(-h) * ((1 + 1 / (2 * r)) * m0 - m1 / (2 * r))):
                return "sign: alpha_s * (1 - e^{-h}) * D, i.e. minus alpha_s * expm1(-h) * D"
            return "x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D; lambda here is log(alpha/sigma)"

        got = _call("dpm_solver_2m_step", fn, case, x, m0, m1, l_p, l_t, l_s, a_s, s_s, s_t)
        worst = max(worst, _compare("dpm_solver_2m_step", got, formula, case, atol=1e-8, rtol=1e-8, hint=hint))
        library = dpm_solver_pp_step(x, [m1, m0], [l_p, l_t], a_s, s_s, s_t, l_s, order=2)
        worst = max(worst, _compare("dpm_solver_2m_step", got, library, case, atol=1e-8, rtol=1e-8, hint=hint))
    _ok("dpm_solver_2m_step", len(cases), "the 2M formula and tld.samplers.dpm_solver_pp_step(order=2)", worst)


# --- lesson 08: classifier-free guidance ------------------------------------------------------------------

def check_guidance(fn) -> None:
    """``fn(out_cond, out_uncond, w) -> out_uncond + w * (out_cond - out_uncond)`` (Ho & Salimans 2022)."""
    from tld.diffusion import get_schedule
    from tld.samplers import make_denoiser

    g = _gen(10)
    schedule = get_schedule("vp-cosine")
    w_cond, w_null = torch.randn(3, 1, 1, generator=g), torch.randn(3, 1, 1, generator=g)

    def model(x, t, cond):  # a toy eps model whose output depends on the condition (null = 2)
        scale = torch.where(cond[:, None, None, None] == 2, w_null, w_cond)
        return torch.tanh(x * scale + t[:, None, None, None])

    worst = 0.0
    ws = (0.0, 1.0, 1.5, 4.0)
    for w in ws:
        x = torch.randn(2, 3, 4, 4, generator=g)
        t = torch.tensor(0.6)
        cond, null = torch.tensor([0, 1]), torch.tensor([2, 2])
        tb = t.expand(2)
        out_c, out_u = model(x, tb, cond), model(x, tb, null)
        case = f"guidance w = {w} on eps outputs of shape {tuple(x.shape)}"

        def hint(got, exp, out_c=out_c, out_u=out_u, w=w):
            if _close(got, out_c + w * (out_c - out_u)):
                return ("that is U-ViT's convention (its scale s equals w - 1); here w = 1 must give the "
                        "conditional output: uncond + w * (cond - uncond)")
            if _close(got, out_u + w * (out_u - out_c)):
                return "the direction points from the unconditional to the conditional output: cond - uncond"
            return "out_uncond + w * (out_cond - out_uncond): w = 0 gives uncond, w = 1 gives cond"

        got = _call("guidance", fn, case, out_c, out_u, w)
        # the library's guided denoiser, in eps space: its eps prediction is the guided output
        _, eps = make_denoiser(model, schedule, "eps", cond, null, guidance=w)(x, t)
        worst = max(worst, _compare("guidance", got, eps, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("guidance", len(ws), "tld.samplers.make_denoiser(guidance=w)", worst)


# --- lesson 06: the training loop ------------------------------------------------------------------

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


def check_ema_update(fn) -> None:
    """``fn(ema, model, decay)``: in place, ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    import copy

    from torch import nn

    from tld.train import ema_update

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
            raise CheckError(f"check_ema_update: your function changed the model's weights; only the EMA copy "
                             f"should change\n  on {case}")

        def hint(got, exp, before=before, weights=weights, decay=decay):
            if _close(got, before, 1e-7):
                return ("the EMA did not change: update its parameters in place (p_ema.mul_(decay).add_(p, "
                        "alpha=1 - decay) or p_ema.lerp_(p, 1 - decay)); assigning to the loop variable changes nothing")
            if _close(got, (1 - decay) * before + decay * weights):
                return ("decay weighs the old average: ema = decay * ema + (1 - decay) * model, so a decay near 1 "
                        "is a long, slow average")
            if _close(got, weights):
                return "that copies the model; blend it in with weight (1 - decay)"
            return "for each pair (p_ema, p) of ema.parameters() and model.parameters(): decay * p_ema + (1 - decay) * p"

        worst = max(worst, _compare("ema_update", _flat(ema), _flat(expected), case, atol=1e-6, rtol=1e-6,
                                    hint=hint))
    _ok("ema_update", len(cases), "tld.train.ema_update", worst)


def _lr_variant(step, lr, warmup, max_steps, ratio, plus_one=True, floor=True, clamp=True, from_warmup=True):
    """tld.train.lr_at's formula with one piece switched off: the usual mistakes, for hints."""
    if step < warmup:
        return lr * (step + plus_one) / warmup
    start = warmup if from_warmup else 0
    progress = (step - start) / max(1, max_steps - start)
    progress = min(1.0, progress) if clamp else progress
    r = ratio if floor else 0.0
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_lr_at(fn) -> None:
    """``fn(step, lr, warmup_steps, max_steps, min_lr_ratio) -> float``: linear warmup, then cosine decay."""
    from tld.train import TrainConfig, lr_at

    cases = [(1e-3, 10, 100, 0.1), (2e-3, 0, 50, 0.0), (5e-4, 25, 40, 0.5), (1.0, 1, 7, 0.1)]
    worst = 0.0
    for lr, warmup, max_steps, ratio in cases:
        cfg = TrainConfig(lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=ratio, lr_schedule="cosine")
        steps = range(max_steps + 4)  # a few steps past the end: the rate holds at its floor
        case = (f"lr {lr}, warmup_steps {warmup}, max_steps {max_steps}, min_lr_ratio {ratio}; "
                f"steps 0..{max_steps + 3} (the index below is the step)")
        got = torch.stack([_scalar("lr_at", _call("lr_at", fn, case, s, lr, warmup, max_steps, ratio),
                                   f"{case}, step {s}") for s in steps])
        expected = torch.tensor([lr_at(cfg, s) for s in steps], dtype=torch.float64)

        def hint(got, exp, args=(lr, warmup, max_steps, ratio)):
            variants = [({"plus_one": False}, "count the current step in warmup: lr * (step + 1) / warmup_steps, "
                                              "so step 0 already trains (with step / warmup_steps it does nothing)"),
                        ({"floor": False}, "decay to lr * min_lr_ratio, not to 0: "
                                           "lr * (r + (1 - r) * 0.5 * (1 + cos(pi * progress)))"),
                        ({"clamp": False}, "after max_steps hold the final rate: progress = min(1, ...)"),
                        ({"from_warmup": False}, "the cosine starts where warmup ends: "
                                                 "progress = (step - warmup_steps) / (max_steps - warmup_steps)")]
            for kw, text in variants:
                if _close(got, torch.tensor([_lr_variant(s, *args, **kw) for s in range(len(got))],
                                            dtype=torch.float64), 1e-9):
                    return text
            return ("step < warmup_steps: lr * (step + 1) / warmup_steps; after it, progress p = (step - warmup) / "
                    "(max_steps - warmup) capped at 1, and lr * (r + (1 - r) * (1 + cos(pi p)) / 2)")

        worst = max(worst, _compare("lr_at", got, expected, case, atol=1e-12, rtol=1e-9, hint=hint))
    _ok("lr_at", len(cases), "tld.train.lr_at", worst)


def check_cfg_training_loss(fn) -> None:
    """``fn(model, x0, labels, t, eps, drop, schedule) -> loss``: one step's v-loss, dropped labels -> null class.

    The loss of ``tld.train``'s step: labels where ``drop`` is True become the null class
    ``model.num_classes``; x_t = alpha_t x0 + sigma_t eps; the mean of (model(x_t, t, labels) - v)^2
    with v = alpha_t eps - sigma_t x0.
    """
    from tld import diffusion
    from tld.models import create

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
            raise CheckError(f"check_cfg_training_loss: your function changed the labels it was given (now "
                             f"{given.tolist()}); clone them first, the batch belongs to the data loader\n  on {case}"
                             f"\n  hint: cond = labels.clone(); cond[drop] = model.num_classes")
        if torch.is_tensor(got) and not got.requires_grad:
            raise CheckError(f"check_cfg_training_loss: the loss carries no gradient (requires_grad is False), "
                             f"so backward() cannot train the model\n  on {case}\n  hint: do not compute it under "
                             f"torch.no_grad() and do not .detach() or .item() it")

        def hint(got, exp, x0=x0, eps=eps, t=t, labels=labels, drop=drop, x_t=x_t, schedule=schedule, model=model):
            a, s = schedule.alpha(t).view(-1, 1, 1, 1), schedule.sigma(t).view(-1, 1, 1, 1)
            with torch.no_grad():
                pred = model(x_t, t, torch.where(drop, model.num_classes, labels))
                if got.shape == (len(t),):
                    return "average over the batch: the loss is one number (.mean()), not one per example"
                if _close(got, (pred - eps).pow(2).mean(), 1e-6):
                    return "that is the eps loss; the target here is v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022)"
                if _close(got, (pred - (a * x0 - s * eps)).pow(2).mean(), 1e-6):
                    return "v = alpha_t * eps - sigma_t * x0 (eps and x0 swapped)"
                if drop.any() and _close(got, diffusion.loss(model(x_t, t, labels), x0, eps, t, schedule, "v").mean(), 1e-6):
                    return "replace the label of every dropped example (drop True) by the null class, model.num_classes"
                if drop.any() and _close(got, diffusion.loss(model(x_t, t, torch.where(drop, 0, labels)), x0, eps, t,
                                                             schedule, "v").mean(), 1e-6):
                    return "the null class is model.num_classes (one past the real classes), not 0"
            return ("x_t = alpha_t * x0 + sigma_t * eps (alpha_t, sigma_t as [B, 1, 1, 1]); "
                    "loss = ((model(x_t, t, cond) - v) ** 2).mean()")

        worst = max(worst, _compare("cfg_training_loss", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("cfg_training_loss", len(cases), "tld.diffusion.loss on tld.train's step (v target, null class)", worst)


# --- lesson 09: CLIP text conditioning -------------------------------------------------------------

def check_clip_loss(fn) -> None:
    """``fn(text, image, logit_scale) -> loss``: CLIP's symmetric cross-entropy over the [B, B] similarities."""
    import torch.nn.functional as F

    from tld.text import clip_loss

    g = _gen(14)
    cases = [(6, 8, 2.0), (4, 16, math.log(1 / 0.07)), (5, 8, 5.0), (1, 4, 2.0)]  # 5.0: e^5 = 148, clamped to 100
    worst = 0.0
    for b, d, log_scale in cases:
        text = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        image = F.normalize(text + torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        scale = torch.tensor(log_scale, dtype=torch.float64)
        case = f"text and image unit vectors {(b, d)}, logit_scale {log_scale:.4f} (temperature e^logit_scale)"

        def hint(got, exp, text=text, image=image, scale=scale):
            sim, labels = text @ image.T, torch.arange(len(text))
            logits = scale.exp().clamp(max=100) * sim
            if _close(got, F.cross_entropy(logits, labels), 1e-9) or _close(got, F.cross_entropy(logits.T, labels), 1e-9):
                return "CLIP's loss is symmetric: average the text->image and the image->text cross-entropies"
            both = (lambda lg: (F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels)) / 2)
            if _close(got, both(scale * sim), 1e-9):
                return "logit_scale is a log: multiply the similarities by logit_scale.exp()"
            if _close(got, both(scale.exp() * sim), 1e-9):
                return "clamp the temperature at 100 as CLIP does: logit_scale.exp().clamp(max=100)"
            if _close(got, both(sim), 1e-9):
                return "scale the cosine similarities by the temperature logit_scale.exp() before the softmax"
            return ("logits = logit_scale.exp().clamp(max=100) * text @ image.T; the right answer of row i is column i; "
                    "(cross_entropy(logits, i) + cross_entropy(logits.T, i)) / 2")

        got = _call("clip_loss", fn, case, text, image, scale)
        worst = max(worst, _compare("clip_loss", got, clip_loss(text, image, scale), case, atol=1e-9, rtol=1e-9,
                                    hint=hint))
    _ok("clip_loss", len(cases), "tld.text.clip_loss", worst)


class _ToyCLIP:
    """A stand-in for TinyCLIP in tld.text.retrieval_accuracy: it knows each image's caption, plus noise.

    With ``prefer_copy`` a caption scores highest the *last* image that shares it, so a batch with a
    repeated caption retrieves the other copy (a right answer that is not on the diagonal).
    """

    image_size = 16

    def __init__(self, noise: float, seed: int, prefer_copy: bool = False):
        self.noise, self.gen, self.prefer_copy, self.seen = noise, _gen(seed), prefer_copy, None

    def similarity(self, prompts, images):
        n = len(prompts)
        same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float64)
        sim = same + (1e-3 * torch.arange(n, dtype=torch.float64)[None] if self.prefer_copy else 0)
        sim = sim + self.noise * torch.randn(n, n, generator=self.gen, dtype=torch.float64)
        self.seen = (sim, list(prompts))
        return sim


def check_retrieval_accuracy(fn) -> None:
    """``fn(sim, captions) -> float``: caption -> image retrieval accuracy from a [n, n] similarity matrix.

    Row i is caption i, column j is image j (whose caption is captions[j]); a pick counts as right when
    the picked image has the query's caption, as in ``tld.text.retrieval_accuracy``.
    """
    from tld.text import retrieval_accuracy

    cases = [(0.0, True, 64, 1), (0.6, False, 40, 2), (3.0, False, 25, 3)]
    worst = 0.0
    for noise, prefer_copy, n, seed in cases:
        toy = _ToyCLIP(noise, 100 + seed, prefer_copy)
        expected = torch.tensor(retrieval_accuracy(toy, n=n, seed=seed, batch=n), dtype=torch.float64)
        sim, captions = toy.seen
        repeats = n - len(set(captions))
        case = (f"sim {(n, n)} from {n} shapes images (dataset seed {seed}, {repeats} repeated captions), "
                f"noise {noise}" + (", each caption scoring its last copy highest" if prefer_copy else ""))

        def hint(got, exp, sim=sim, captions=captions, n=n):
            pick = sim.argmax(1)
            if _close(got, (pick == torch.arange(n)).double().mean(), 1e-9):
                return ("a batch can show the same caption twice: a pick is right when captions[pick] == captions[i], "
                        "whichever copy it picked")
            if _close(got, exp * n, 1e-9):
                return f"return the fraction of right picks (divide by the {n} captions), not the count"
            right = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(0).tolist())]
            if _close(got, torch.tensor(sum(right) / n, dtype=torch.float64), 1e-9):
                return "each row is a caption: pick the best image with sim.argmax(dim=1)"
            return "pick = sim.argmax(1); accuracy = mean over i of [captions[pick[i]] == captions[i]]"

        got = _scalar("retrieval_accuracy", _call("retrieval_accuracy", fn, case, sim.clone(), list(captions)), case)
        worst = max(worst, _compare("retrieval_accuracy", got, expected, case, atol=1e-9, rtol=0, hint=hint))
    _ok("retrieval_accuracy", len(cases), "tld.text.retrieval_accuracy", worst)


def check_eos_pool(fn) -> None:
    """``fn(tokens, mask) -> [B, width]``: the state of each prompt's last real token ([EOS]), CLIP's pooling."""
    import torch.nn.functional as F

    from tld.text import TinyCLIP, shapes_captions, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(shapes_captions(seed=0, n=300), vocab_size=128, context_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(15)
        clip = TinyCLIP(tokenizer, dim=16, width=24, depth=1, heads=2, image_size=8, image_width=4).eval()
    long = "a red circle at the top left and a blue square in the center and a green triangle"
    cases = [["a red circle at the top left", "", "a cyan square"],
             ["a yellow triangle on the right", "square", "a magenta circle at the bottom right", "a blue square"],
             [long, "a green circle"]]
    worst = 0.0
    for prompts in cases:
        with torch.no_grad():
            pooled, tokens, mask = clip.encode(prompts)
        n_real = mask.sum(1)
        case = (f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} of TinyCLIP(width 24) for {prompts} "
                f"({n_real.tolist()} real tokens each, padding zeroed)")
        expected = tokens[torch.arange(len(prompts)), n_real - 1]

        def hint(got, exp, tokens=tokens, mask=mask, n_real=n_real):
            rows = torch.arange(len(tokens))
            if _close(got, tokens[:, -1], 1e-6):
                return ("tokens[:, -1] is a padding slot for every prompt shorter than the context: pick position "
                        "mask.sum(1) - 1 of each prompt")
            if _close(got, (tokens * mask[..., None]).sum(1) / n_real[:, None], 1e-6):
                return "that is mean pooling; CLIP (and TinyCLIP) take the state of the [EOS] token, the last real one"
            if _close(got, tokens[rows, n_real.clamp(max=tokens.shape[1] - 1)], 1e-6):
                return "off by one: the last real token sits at index mask.sum(1) - 1 (positions count from 0)"
            if _close(got, tokens[:, 0], 1e-6):
                return "position 0 is [BOS], the same token opening every prompt; take the last real token"
            return "last = mask.sum(1) - 1; pooled = tokens[torch.arange(B), last]"

        got = _call("eos_pool", fn, case, tokens.clone(), mask.clone())
        worst = max(worst, _compare("eos_pool", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint))
        with torch.no_grad():  # projected and normalised, your state is TinyCLIP's pooled output
            worst = max(worst, _compare("eos_pool", F.normalize(clip.text_proj(got), dim=-1), pooled, case,
                                        atol=1e-5, rtol=1e-5))
    _ok("eos_pool", len(cases), "the pooled output of tld.text.TinyCLIP.encode", worst)


# --- lesson 10: latent diffusion -------------------------------------------------------------------

def _posterior(shape, g, lo=-4.0, hi=1.0):
    mean = torch.randn(shape, generator=g)
    logvar = torch.rand(shape, generator=g) * (hi - lo) + lo
    return mean, logvar


def check_vae_sample(fn) -> None:
    """``fn(mean, logvar, eps) -> z = mean + exp(logvar / 2) * eps``: the reparameterised VAE sample."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = _gen(16)
    cases = [(2, 4, 4, 4), (1, 3, 8, 8), (3, 2, 2, 2)]
    worst = 0.0
    for i, shape in enumerate(cases):
        mean, logvar = _posterior(shape, g)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
        expected = posterior.sample(_gen(100 + i))
        eps = torch.randn(shape, generator=_gen(100 + i))  # the same draw as the library's sample
        case = f"mean, logvar and eps of shape {shape}, logvar in [-4, 1]"

        def hint(got, exp, mean=mean, logvar=logvar, eps=eps):
            if _close(got, mean + logvar.exp() * eps):
                return "logvar is log(sigma^2): the standard deviation is exp(0.5 * logvar), not exp(logvar)"
            if _close(got, mean + logvar * eps):
                return "logvar is a log variance: std = exp(0.5 * logvar)"
            return "z = mean + std * eps with std = exp(0.5 * logvar) (Kingma & Welling 2014, the reparameterisation)"

        got = _call("vae_sample", fn, case, mean, logvar, eps)
        worst = max(worst, _compare("vae_sample", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("vae_sample", len(cases), "diffusers' DiagonalGaussianDistribution.sample (the AutoencoderKL posterior)", worst)


def check_vae_kl(fn) -> None:
    """``fn(mean, logvar) -> [B]``: KL(N(mean, e^logvar) || N(0, I)) summed over C, H, W, one per image."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = _gen(17)
    cases = [((2, 4, 4, 4), "random"), ((3, 2, 8, 8), "random"), ((2, 4, 2, 2), "standard normal: KL 0")]
    worst = 0.0
    for shape, kind in cases:
        mean, logvar = _posterior(shape, g)
        if kind != "random":
            mean, logvar = torch.zeros(shape), torch.zeros(shape)
        expected = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl()
        case = f"mean and logvar of shape {shape} ({kind})"

        def hint(got, exp, mean=mean, logvar=logvar):
            terms = mean.pow(2) + logvar.exp() - 1 - logvar
            if _close(got, terms.sum([1, 2, 3])):
                return "the Gaussian KL has a factor 1/2: 0.5 * (mean^2 + var - 1 - logvar)"
            if _close(got, 0.5 * terms.mean([1, 2, 3])):
                return "sum over C, H, W (one number per image), as diffusers' DiagonalGaussianDistribution.kl() does"
            if got.numel() == 1:
                return f"one KL per image: return shape [{len(exp)}], summed over dims 1, 2, 3 only"
            return "KL = 0.5 * sum over C, H, W of (mean^2 + exp(logvar) - 1 - logvar)"

        got = _call("vae_kl", fn, case, mean, logvar)
        worst = max(worst, _compare("vae_kl", got, expected, case, atol=1e-4, rtol=1e-5, hint=hint))
    _ok("vae_kl", len(cases), "diffusers' DiagonalGaussianDistribution.kl (the AutoencoderKL's KL-reg)", worst)


def _tiny_vae_latents(seed: int, latent_channels: int, widths):
    """A small untrained AutoencoderKL and shapes images it encodes (unscaled posterior means)."""
    from diffusers import AutoencoderKL

    from tld.autoencoder import tiny_vae_config
    from tld.data import ShapesDataset

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_vae_config(latent_channels, widths)).eval()
    images = ShapesDataset(size=16, seed=seed, length=8).batch(range(8))["image"]
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
    return vae, images, z


def check_latent_scale(fn) -> None:
    """``fn(z) -> float``: the latent scale factor 1 / std(z), over every number of the unscaled latents."""
    from tld.autoencoder import latent_scale

    g = _gen(18)
    cases = ["synthetic", (0, 4, (8, 8)), (1, 2, (8, 8, 8))]
    worst = 0.0
    for spec in cases:
        if spec == "synthetic":
            z = 3.0 + 0.2 * torch.randn(4, 4, 4, 4, generator=g)
            expected = 1 / z.std()
            case = "synthetic latents z of shape (4, 4, 4, 4), mean 3, std 0.2"
        else:
            seed, channels, widths = spec
            vae, images, z = _tiny_vae_latents(seed, channels, widths)
            expected = torch.tensor(latent_scale(vae, images))
            case = (f"latents {tuple(z.shape)} of 8 shapes images from a small AutoencoderKL "
                    f"({channels} latent channels, widths {widths})")

        def hint(got, exp, z=z):
            if _close(got, z.std().double()):
                return "that is the spread itself; the scale divides by it: 1 / z.std()"
            if _close(got, 1 / z.var().double()):
                return "divide by the standard deviation, not the variance"
            if _close(got, 1 / z.pow(2).mean().sqrt().double()):
                return "std subtracts the mean (1 / root-mean-square is not 1 / std): use 1 / z.std()"
            return "one number for all the latents: 1 / z.std() (LDM; Stable Diffusion's VAE gives 0.18215)"

        got = _scalar("latent_scale", _call("latent_scale", fn, case, z.clone()), case)
        worst = max(worst, _compare("latent_scale", got, expected.double(), case, atol=1e-6, rtol=1e-5, hint=hint))
    _ok("latent_scale", len(cases), "1 / z.std() and tld.autoencoder.latent_scale", worst)


def check_psnr(fn) -> None:
    """``fn(a, b) -> float``: PSNR in dB of images in [-1, 1]: 10 log10(2^2 / MSE), MSE floored at 1e-12."""
    from tld.autoencoder import psnr
    from tld.data import ShapesDataset

    g = _gen(19)
    clean = ShapesDataset(size=16, seed=19, length=4).batch(range(4))["image"]
    cases = [(0.1, clean), (0.5, clean[:2]), (0.02, torch.rand(3, 1, 8, 8, generator=g) * 2 - 1), (0.0, clean[:1])]
    worst = 0.0
    for noise, a in cases:
        b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
        expected = torch.tensor(psnr(a, b), dtype=torch.float64)
        case = (f"images {tuple(a.shape)} in [-1, 1] against a copy with noise std {noise}"
                + (" (identical: MSE 0)" if noise == 0 else ""))

        def hint(got, exp, a=a, b=b):
            mse = (a - b).pow(2).mean().item()
            if mse == 0 and not torch.isfinite(got).all():
                return "identical images have MSE 0: floor it, max(mse, 1e-12), so PSNR is a finite 126 dB"
            if mse and _close(got, torch.tensor(10 * math.log10(1 / mse)), 1e-4):
                return "the images span [-1, 1]: the peak-to-peak range is 2, so PSNR = 10 log10(2^2 / MSE)"
            if mse and _close(got, torch.tensor(20 * math.log10(4 / mse)), 1e-4):
                return "PSNR = 10 log10(peak^2 / MSE) (20 log10 goes with peak / RMSE)"
            return "mse = ((a - b) ** 2).mean(); psnr = 10 * log10(4 / max(mse, 1e-12))"

        got = _scalar("psnr", _call("psnr", fn, case, a.clone(), b.clone()), case)
        worst = max(worst, _compare("psnr", got, expected, case, atol=1e-3, rtol=1e-5, hint=hint))
    _ok("psnr", len(cases), "tld.autoencoder.psnr", worst)


CHECKERS = {name[len("check_"):]: obj for name, obj in dict(globals()).items()
            if name.startswith("check_") and callable(obj)}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tld.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exercises", help="write exercises/ from solutions/")
    ex.add_argument("--check", action="store_true", help="write nothing; fail if exercises/ is out of date")
    rn = sub.add_parser("run", help="run every lesson and solution with papermill into build/")
    rn.add_argument("--preset", default="cpu", choices=PRESETS)
    rn.add_argument("--out", default=str(REPO / "build"))
    rn.add_argument("--only", default=None, help="comma-separated lesson numbers, e.g. 01,02")
    rn.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.command == "exercises":
        changed = write_exercises(check=args.check)
        if args.check:
            for p in changed:
                print(f"out of date: {p} (run `python -m tld.course exercises`)")
            return 1 if changed else 0
        print(f"wrote {len(changed)} exercise notebook(s)" + "".join(f"\n  {p}" for p in changed))
        return 0
    paths = lessons()
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        paths = [p for p in paths if p.name[:2] in keep]
    rows = run_course(args.preset, paths, args.out, timeout=args.timeout)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
