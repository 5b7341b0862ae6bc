"""Claims of tld.course: exercises come from solutions, checkers explain mistakes, the runner runs.

Every checker passes on the solution in solutions/, fails on the stub in exercises/ and on a
plausible wrong answer, each time with a CheckError that names the task and says what differs.
"""

import json
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from tld import course
from tld.course import CHECKERS, CheckError, exercise_notebook, exercise_source, write_exercises

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((REPO / "solutions").glob("[0-9][0-9]_*.ipynb"))


# --------------------------------------------------------------------------- the generator

def test_committed_exercises_equal_freshly_generated_ones(tmp_path):
    fresh = tmp_path / "exercises"
    write_exercises(REPO / "solutions", fresh)
    committed = sorted(p.name for p in (REPO / "exercises").glob("*.ipynb"))
    assert committed == [p.name for p in SOLUTIONS], "one exercise notebook per solution notebook"
    for name in committed:
        assert (fresh / name).read_text() == (REPO / "exercises" / name).read_text(), \
            f"exercises/{name} is stale: run `python -m tld.course exercises`"
    assert write_exercises(check=True) == []


def test_generator_stubs_a_block_at_the_indentation_of_its_begin_marker():
    src = ("import torch\n"
           "def outer(x):\n"
           "    def inner(y):\n"
           "        # BEGIN SOLUTION\n"
           "        z = y * 2\n"
           "        return z\n"
           "        # END SOLUTION\n"
           "    return inner(x)\n"
           "# BEGIN SOLUTION\n"
           "answer = 42\n"
           "# END SOLUTION\n"
           "print(answer)")
    out = exercise_source(src)
    assert out == ("import torch\n"
                   "def outer(x):\n"
                   "    def inner(y):\n"
                   '        raise NotImplementedError("exercise: write inner")\n'
                   "    return inner(x)\n"
                   'raise NotImplementedError("exercise: fill in this part")\n'
                   "print(answer)")
    compile(out, "<exercise>", "exec")


@pytest.mark.parametrize("src, message", [
    ("# BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n# END SOLUTION\n", "without a '# BEGIN SOLUTION'"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "inside another solution block"),
])
def test_generator_rejects_unbalanced_markers_naming_the_line(src, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        exercise_source(src, where="demo.ipynb, cell 3")
    assert "demo.ipynb, cell 3, line" in str(info.value)


def test_generator_drops_solution_prose_clears_outputs_and_points_the_badge_at_exercises():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("[badge](https://x/blob/main/solutions/01_a.ipynb)\n"
                                      "<!-- BEGIN SOLUTION -->\nsolutions only\n<!-- END SOLUTION -->\nkept"),
        nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION",
                                  outputs=[nbformat.v4.new_output("stream", text="1")], execution_count=3),
    ])
    ex = exercise_notebook(nb, "01_a.ipynb")
    assert ex.cells[0].source == "[badge](https://x/blob/main/exercises/01_a.ipynb)\nkept"
    assert ex.cells[1].outputs == [] and ex.cells[1].execution_count is None
    assert "return 1" in nb.cells[1].source, "the solution notebook itself is left untouched"
    with pytest.raises(ValueError, match="no '# BEGIN SOLUTION' block"):
        exercise_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), "02_b.ipynb")


# --------------------------------------------------------------------------- the checkers

def _functions(path: Path) -> dict:
    """Run a notebook's import cell and its task cells; return {task: function} from its check_ calls."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    ns: dict = {}
    imports = next(c for c in cells if c.source.lstrip().startswith(("import", "from")) and "!pip" not in c.source)
    exec(compile(imports.source, f"{path.name}:imports", "exec"), ns)
    for c in cells:
        if re.search(r"^\s*def \w+", c.source, re.M) and ("BEGIN SOLUTION" in c.source or "NotImplementedError" in c.source):
            exec(compile(c.source, f"{path.name}:task", "exec"), ns)
    calls = re.findall(r"^check_(\w+)\((\w+)\)", "\n".join(c.source for c in cells), re.M)
    return {task: ns[fn] for task, fn in calls}


SOLVED = {task: fn for p in SOLUTIONS for task, fn in _functions(p).items()}
STUBS = {task: fn for p in sorted((REPO / "exercises").glob("[0-9][0-9]_*.ipynb")) for task, fn in _functions(p).items()}

SLOW_TASKS = {"adherence_at", "real_fid"}   # they sample the shipped model or embed 1024 images
BY_SPEED = [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_TASKS else t for t in sorted(CHECKERS)]


def _wrong_sincos(dim, grid):  # x and y halves swapped
    from tld.patch import sincos_2d
    e = sincos_2d(dim, grid)
    return torch.cat([e[:, dim // 2:], e[:, : dim // 2]], 1)


def _swapped_ema(ema, model, decay):  # the weights of the average and of the model swapped
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.mul_(1 - decay).add_(p, alpha=decay)


def _loss_without_dropout(model, x0, labels, t, eps, drop, schedule):  # forgets the null class
    a, s = schedule.alpha(t)[:, None, None, None], schedule.sigma(t)[:, None, None, None]
    return (model(a * x0 + s * eps, t, labels) - (a * eps - s * x0)).pow(2).mean()


def _guided_at_x0(denoiser, log_prob, scale, schedule):  # the gradient taken at x0_pred, not through the denoiser
    def guided(x, t):
        x0, eps = denoiser(x, t)
        x0 = x0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(log_prob(x0).sum(), x0)
        a, s = schedule.alpha(t).item(), schedule.sigma(t).item()
        return x0.detach() + scale * s**2 / a * g, eps.detach() - scale * s * g
    return guided


def _inversion_without_iterations(denoiser, x_u, t_u, t_v, schedule, iters):  # iters ignored
    x0, eps = denoiser(x_u, torch.tensor(t_u, dtype=torch.float64))
    t_v = torch.tensor(t_v, dtype=torch.float64)
    return schedule.alpha(t_v).item() * x0 + schedule.sigma(t_v).item() * eps


def _round_trip_mse(model, x0, schedule, steps, prediction, iters):  # mean squared, not root mean squared
    from tld.samplers import invert, sample, sampling_grid
    x_t = invert(model, x0, schedule, steps=steps, prediction=prediction, iters=iters, progress=False)
    back = sample(model, x_t, schedule, steps=steps, prediction=prediction, progress=False,
                  t_start=sampling_grid(schedule, steps, prediction)[0].item())
    return (back - x0).pow(2).mean().item()


def _arc_over_chord(trajectory):  # straightness upside down
    p = torch.stack([x.double() for x in trajectory]).flatten(2)
    return (p[1:] - p[:-1]).norm(dim=2).sum(0) / (p[-1] - p[0]).norm(dim=1)


def _phrase_position(caption):  # keeps the phrase 'at the top left' as the position
    w = caption.split()
    return {"shape": w[2], "color": w[1], "position": " ".join(w[3:])}


def _hard_circle(size, cx, cy, radius):  # no anti-aliasing
    c = torch.arange(size, dtype=torch.float64) + 0.5
    return ((((c[None] - cx) ** 2 + (c[:, None] - cy) ** 2).sqrt() - radius) <= 0).double()


def _last_index_of_every_class(ds):  # off by one: the index of the item that completes the set
    seen, i = set(), 0
    while len(seen) < ds.num_classes:
        seen.add(ds[i]["label"])
        i += 1
    return i - 1


def _bisect_one_minus(schedule):  # 1 - t
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if schedule.log_snr(torch.tensor(mid, dtype=torch.float64)) > 0 else (lo, mid)
    return 1 - lo


def _reshaped_conv(linear, p, c):  # the weight reshaped, not reordered
    conv = torch.nn.Conv2d(c, linear.out_features, p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(linear.out_features, c, p, p))
        conv.bias.copy_(linear.bias)
    return conv


def _nearest_with_self(emb, grid):  # forgets to leave each position out of its own search
    near = (emb @ emb.T).argmax(1)
    r, c = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    return (((r - r[near]).abs() + (c - c[near]).abs()) == 1).double().mean().item()


def _mask_after_softmax(q, k, v, mask):
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) * mask[:, None, None, :]
    return w @ v


def _fifo_blocks(model, x):  # first in, first out
    skips = []
    for blk in model.in_blocks:
        x = blk(x)
        skips.append(x)
    x = model.mid_block(x)
    for blk in model.out_blocks:
        x = blk(x, skips.pop(0))
    return x


def _ungated_block(block, x, c):  # forgets the gates
    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + block.attn(block.norm1(x) * (1 + sc1[:, None]) + sh1[:, None])
    return x + block.mlp(block.norm2(x) * (1 + sc2[:, None]) + sh2[:, None])


def _zero_tensors(block, x, c):  # counts tensors, not numbers
    block.zero_grad(set_to_none=True)
    block(x, c).pow(2).sum().backward()
    ps = list(block.parameters())
    return sum(p.grad is None or bool((p.grad == 0).all()) for p in ps) / len(ps)


def _squared_norm_clip(model, max_norm):  # the sum of squares, no square root
    grads = [p.grad for p in model.parameters()]
    total = sum(g.pow(2).sum() for g in grads)
    for g in grads:
        g.mul_(min(1.0, max_norm / (total.item() + 1e-6)))
    return total


def _posterior_mean(x, x0, a_t, s_t, a_s, s_s, noise):  # forgets the noise
    a_ts = a_t / a_s
    return (a_ts * s_s**2 / s_t**2) * x + (a_s * (s_t**2 - a_ts**2 * s_s**2) / s_t**2) * x0


def _sampler_mse(sampler, steps):  # the mean squared error, not its root
    from tld.course.checks.l07_samplers import _sampler_problem
    from tld.samplers import sample
    p = _sampler_problem()
    x = sample(p["model"], p["noise"], p["schedule"], sampler=sampler, steps=steps, progress=False)
    return (x - p["reference"]).pow(2).mean().item()


def _batch_rescale(cond, guided, phi):  # one std for the whole batch
    return phi * guided * cond.std() / guided.std() + (1 - phi) * guided


def _adherence_count(w):  # a count, not a fraction
    from tld.course.checks.l08_guidance import _adherence
    return 18 * _adherence(w)


def _overlapping_merge(words):  # merges every occurrence, reusing symbols
    counts = {}
    for w in words:
        for pair in zip(w, w[1:]):
            counts[pair] = counts.get(pair, 0) + 1
    best = max(counts, key=counts.get)
    out = []
    for w in words:
        new = [w[i] + w[i + 1] if (w[i], w[i + 1]) == best else w[i] for i in range(len(w) - 1)] + [w[-1]]
        out.append(new)
    return best, out


def _batch_psnr(a, b):  # the whole batch's PSNR, repeated
    mse = (a - b).pow(2).mean().clamp(min=1e-12)
    return (10 * torch.log10(4 / mse)).expand(len(a))


def _total_gain(images, noise, stds):  # the total gain, not per halving
    mse = [(s * noise).pow(2).mean().item() for s in (stds[0], stds[-1])]
    return 10 * math.log10(mse[0] / mse[1])


def _column_major_subgrids(x):  # sub-grids in the order (0, 0), (1, 0), (0, 1), (1, 1)
    return torch.stack([x[:, :, a::2, b::2].flatten(2).transpose(1, 2) for b in (0, 1) for a in (0, 1)], 1)


def _fold_without_identity(k5, k3, k1):
    k = k5.clone()
    k[:, :, 1:4, 1:4] += k3
    k[:, :, 2:3, 2:3] += k1
    return k


def _full_over_down(side):
    from tld.course.checks.l11_udit import _flops
    return 1 / _flops(side)


def _fid_sqrt(mu1, s1, mu2, s2):  # the distance, not its square
    from tld.fid import frechet_distance
    return math.sqrt(frechet_distance(mu1, s1, mu2, s2))


def _biased_kid(fa, fb):  # keeps the diagonal
    d = fa.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    return float(k(fa, fa).mean() + k(fb, fb).mean() - 2 * k(fa, fb).mean())


def _overlapping_fid(features, n):  # half of the second set is the first
    from tld.fid import feature_statistics, frechet_distance
    return frechet_distance(*feature_statistics(features[:n]), *feature_statistics(features[n // 2:n // 2 + n]))


# a plausible mistake for each task, and a word its hint must contain
WRONG = {
    "add_noise": (lambda x0, eps, t, s: s.alpha(t).view(-1, 1, 1, 1) ** 2 * x0 + s.sigma(t).view(-1, 1, 1, 1) ** 2 * eps,
                  "square"),
    "log_snr": (lambda t, s: torch.log(s.alpha(t) / s.sigma(t)), "half"),
    "patchify": (lambda x, p: x.reshape(x.shape[0], x.shape[1], x.shape[2] // p, p, x.shape[3] // p, p)
                 .permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], -1, p * p * x.shape[1]), "(p, p, C)"),
    "unpatchify": (lambda tok, p, c: tok.reshape(tok.shape[0], math.isqrt(tok.shape[1]), math.isqrt(tok.shape[1]), c, p, p)
                   .permute(0, 3, 1, 4, 2, 5).reshape(tok.shape[0], c, math.isqrt(tok.shape[1]) * p, -1), "wrong places"),
    "sincos_2d": (_wrong_sincos, "swapped"),
    "attention": (lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, "sqrt(d)"),
    "split_heads": (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], x.shape[2] // h), "every token"),
    "skip_fusion": (lambda deep, shallow, linear: linear(torch.cat([shallow, deep], -1)), "deep first"),
    "timestep_embedding": (lambda t, dim: torch.cat([torch.sin(a := (1000 * t)[:, None] * torch.exp(
        -math.log(10000) * torch.arange(dim // 2) / (dim // 2))[None]), torch.cos(a)], -1), "[cos, sin]"),
    "modulate": (lambda x, shift, scale: x * scale[:, None] + shift[:, None], "1 + scale"),
    "gate": (lambda x, g, branch: g[:, None] * branch, "residual"),
    "ddim_step": (lambda x, eps, a_t, s_t, a_s, s_s: a_s * x + s_s * eps, "x0_pred"),
    "dpm_solver_2m_step": (lambda x, m0, m1, lp, lt, ls, a_s, s_s, s_t: (s_s / s_t) * x - a_s * math.expm1(-(ls - lt)) * m0,
                           "first-order"),
    "guidance": (lambda c, u, w: c + w * (c - u), "w - 1"),
    "ema_update": (_swapped_ema, "decay weighs the old average"),
    "lr_at": (lambda s, lr, w, n, r: lr * s / w if s < w else
              lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, n - w))))), "current step"),
    "cfg_training_loss": (_loss_without_dropout, "null class"),
    "clip_loss": (lambda text, image, scale: torch.nn.functional.cross_entropy(
        scale.exp().clamp(max=100) * text @ image.T, torch.arange(len(text))), "symmetric"),
    "retrieval_accuracy": (lambda sim, captions: (sim.argmax(1) == torch.arange(len(sim))).double().mean(), "twice"),
    "eos_pool": (lambda tokens, mask: tokens[:, -1], "padding"),
    "vae_sample": (lambda mean, logvar, eps: mean + logvar.exp() * eps, "exp(0.5 * logvar)"),
    "vae_kl": (lambda mean, logvar: (mean ** 2 + logvar.exp() - 1 - logvar).sum([1, 2, 3]), "1/2"),
    "latent_scale": (lambda z: z.std(), "reciprocal"),
    "psnr": (lambda a, b: 10 * math.log10(1 / (a - b).pow(2).mean().item()), "range is 2"),
    "classifier_guided": (_guided_at_x0, "with respect to x_t"),
    "fixed_point_inversion_step": (_inversion_without_iterations, "iteration"),
    "round_trip_error": (_round_trip_mse, "square root"),
    "heun_step": (lambda velocity, x, t, s: x + (s - t) * velocity(x, t), "Euler"),
    "midpoint_step": (lambda velocity, x, t, s: x + 0.5 * (s - t) * (velocity(x, t) + velocity(
        x + (s - t) * velocity(x, t), s)), "Heun"),
    "path_straightness": (_arc_over_chord, "upside down"),
    "parse_caption": (_phrase_position, "not the phrase"),
    "circle_coverage": (_hard_circle, "hard mask"),
    "items_until_every_class": (_last_index_of_every_class, "count the items"),
    "v_target": (lambda x0, eps, t, s: s.alpha(t).view(-1, 1, 1, 1) * x0 - s.sigma(t).view(-1, 1, 1, 1) * eps,
                 "swapped"),
    "snr_one_time": (_bisect_one_minus, "1 - t"),
    "linear_as_conv": (_reshaped_conv, "reorder"),
    "nearest_is_neighbour": (_nearest_with_self, "leave each position out"),
    "masked_attention": (_mask_after_softmax, "before the softmax"),
    "peak_weight": (lambda q, k, scaled: (q @ k.transpose(-2, -1) / (1 if scaled else math.sqrt(q.shape[-1])))
                    .softmax(-1).amax(-1).mean().item(), "scaled=True"),
    "run_blocks": (_fifo_blocks, "last in, first out"),
    "skip_parameter_fraction": (lambda m: sum(b.skip_linear.weight.numel() for b in m.out_blocks)
                                / sum(p.numel() for p in m.parameters()), "biases"),
    "dit_block": (_ungated_block, "gate"),
    "zero_grad_fraction": (_zero_tensors, "count numbers"),
    "clip_grad_norm": (_squared_norm_clip, "square root"),
    "ema_half_life": (lambda d: math.ceil(math.log(0.5) / math.log(d)) - 1, "count the step"),
    "ddpm_step": (_posterior_mean, "posterior mean"),
    "sampler_error": (_sampler_mse, "RMS"),
    "cfg_rescale": (_batch_rescale, "per sample"),
    "adherence_at": (_adherence_count, "fraction"),
    "bpe_merge": (_overlapping_merge, "skip past"),
    "chance_accuracy": (lambda captions: 1 / len(captions), "1/n"),
    "psnr_per_image": (_batch_psnr, "whole batch"),
    "db_per_halving": (_total_gain, "divide the total"),
    "split_subgrids": (_column_major_subgrids, "(0, 1) comes before (1, 0)"),
    "fold_kernels": (_fold_without_identity, "identity"),
    "flop_ratio": (_full_over_down, "downsampled over full"),
    "frechet_distance": (_fid_sqrt, "no square root"),
    "kid": (_biased_kid, "biased"),
    "real_fid": (_overlapping_fid, "no image in both"),
}


def test_every_checker_has_a_solution_a_stub_and_a_wrong_answer():
    assert set(CHECKERS) == set(SOLVED) == set(STUBS) == set(WRONG), (
        sorted(CHECKERS), sorted(SOLVED), sorted(STUBS), sorted(WRONG))
    assert min(len(_functions(p)) for p in SOLUTIONS) >= 3, "at least three tasks a lesson"
    lessons = {p.name[:2] for p in SOLUTIONS}
    assert {f"{n:02d}" for n in range(14) if n != 12} <= lessons, sorted(lessons)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_lesson_has_the_three_tiers(path):
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    tiers = set(re.findall(r"^## Task \d+ · (\w+) · `\w+`", text, re.M))
    assert tiers == {"reproduce", "extend", "investigate"}, tiers


@pytest.mark.parametrize("task", BY_SPEED)
def test_checker_passes_on_its_solution_and_says_so(task, capsys):
    CHECKERS[task](SOLVED[task])
    assert f"✓ check_{task}:" in capsys.readouterr().out


@pytest.mark.parametrize("task", sorted(CHECKERS))
def test_checker_fails_on_the_stub_telling_the_learner_to_replace_it(task):
    with pytest.raises(CheckError, match=rf"check_{task}: your function is still the stub .*exercise: write"):
        CHECKERS[task](STUBS[task])


@pytest.mark.parametrize("task", BY_SPEED)
def test_checker_fails_on_a_plausible_mistake_with_what_differs_and_a_hint(task):
    wrong, word = WRONG[task]
    with pytest.raises(CheckError) as info:
        CHECKERS[task](wrong)
    msg = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert msg.startswith(f"check_{task}: ") and "\n  on " in msg, msg
    assert "wrong values: max abs error" in msg or "wrong shape" in msg or "expected" in msg, msg
    assert "hint:" in msg and word in msg, msg


def test_checker_reports_a_wrong_shape_and_a_crash_readably():
    with pytest.raises(CheckError, match=r"wrong shape: got \(1, 3, 4, 4\), expected \(1, 16, 3\)"):
        course.check_patchify(lambda x, p: x)
    with pytest.raises(CheckError, match="raised ZeroDivisionError: division by zero"):
        course.check_modulate(lambda x, shift, scale: 1 / 0)
    with pytest.raises(CheckError, match="returned NoneType, expected a tensor"):
        course.check_attention(lambda q, k, v: None)


# --------------------------------------------------------------------------- the runner

def _tiny(path: Path, params: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(body)],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nbformat.write(nb, path)
    return path


def test_runner_passes_preset_only_where_defined_and_tabulates_failures(tmp_path, capsys):
    pytest.importorskip("papermill")
    src = tmp_path / "notebooks"
    src.mkdir()
    with_preset = _tiny(src / "01_a.ipynb", 'preset = "cpu"\nseed = 0', 'assert preset == "smoke", preset')
    without = _tiny(src / "02_b.ipynb", "seed = 0", "1 / 0")
    rows = course.run_course("smoke", [with_preset, without], tmp_path / "build", timeout=120)
    assert [r["passed"] for r in rows] == [True, False]
    assert "ZeroDivisionError" in rows[1]["error"]
    injected = [c for c in json.loads((tmp_path / "build/notebooks/02_b.ipynb").read_text())["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert not injected, "no preset is passed to a notebook whose parameters cell lacks it"
    out = capsys.readouterr().out
    assert "| lesson | seconds | passed |" in out and "| notebooks/02_b.ipynb |" in out and "NO" in out
    assert json.loads((tmp_path / "build/course.json").read_text())[0]["preset"] == "smoke"


# --------------------------------------------------------------------------- graded hints

def _solution_lines(path: Path) -> dict:
    """{function name: the code lines of its solution blocks} of a solution notebook."""
    found: dict = {}
    for c in nbformat.read(path, as_version=4).cells:
        if c.cell_type != "code":
            continue
        lines, inside, name = c.source.split("\n"), False, None
        for i, line in enumerate(lines):
            if line.strip().startswith(course.BEGIN):
                inside = True
                indent = len(line) - len(line.lstrip())
                name = next((m.group(2) for m in (re.match(r"(\s*)def (\w+)", ln) for ln in reversed(lines[:i]))
                             if m and len(m.group(1)) < indent), None)
            elif line.strip().startswith(course.END):
                inside = False
            elif inside:
                found.setdefault(name, []).append(line)
    return found


MIN_ANSWER_CHARS = 8    # shorter answer fragments ("return x", "h = 0.5") say nothing on their own
MIN_SHAPE_CHARS = 14    # the same line with its names abstracted (x.reshape(B, N, ...) vs x.reshape(b, n, ...))
_NAME = re.compile(r"(?<![.\w])[A-Za-z_]\w*")


def _shape(text: str) -> str:
    """Code with every variable name (not an attribute) replaced by N and whitespace removed."""
    return re.sub(r"\s+", "", _NAME.sub("N", text))


def _answer_fragments(lines) -> set:
    """Each non-trivial solution line, whitespace removed, less its comment and its `return` / `name =`:
    as written (case-folded), and with its names abstracted (so renamed variables still count)."""
    out = set()
    for line in lines:
        code = line.split("#")[0].strip()
        code = re.sub(r"^return\b", "", code).strip()
        code = re.sub(r"^[\w, \[\]()]+=(?!=)", "", code).strip()  # the assignment's target
        if re.fullmatch(r"[\w.]*", code):  # a bare name or attribute is not an answer
            continue
        literal = re.sub(r"\s+", "", code).lower()
        if len(literal) >= MIN_ANSWER_CHARS:
            out.add(("literal", literal))
        shape = _shape(code)
        if len(shape) >= MIN_SHAPE_CHARS:
            out.add(("shape", shape))
    return out


def _leaks(out: str, answers) -> list:
    literal, shape = re.sub(r"\s+", "", out).lower(), _shape(out)
    return [a for kind, a in answers if a in (literal if kind == "literal" else shape)]


def _task_answers() -> dict:
    answers = {}
    for p in SOLUTIONS:
        blocks = _solution_lines(p)
        src = "\n".join(c.source for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")
        for task, fn in re.findall(r"^check_(\w+)\((\w+)\)", src, re.M):
            answers[task] = _answer_fragments(blocks.get(fn, []))
    return answers


ANSWERS = _task_answers()


def _off_by_a_bit(solution):
    """A wrong answer for any task: the solution's result scaled and shifted (in place for a module)."""
    def wrong(*args, **kwargs):
        out = solution(*args, **kwargs)
        module = out if isinstance(out, torch.nn.Module) else next(
            (a for a in args if isinstance(a, torch.nn.Module)), None) if out is None else None
        if module is not None:  # an in-place task (the EMA) or a module built: nudge its weights
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(1.1).add_(0.1)
            return out
        if isinstance(out, (tuple, list, dict, str)):  # a structured answer: one element off
            return type(out)(list(out)[:-1]) if not isinstance(out, (dict, str)) else {}
        return out * 1.1 + 0.1
    return wrong


def _failure_output(check, fn, capsys, **kw) -> str:
    with pytest.raises(CheckError) as info:
        check(fn, **kw)
    return str(info.value) + "\n" + capsys.readouterr().out


def test_every_task_has_answer_lines_to_hide():
    assert set(ANSWERS) == set(CHECKERS)
    assert all(ANSWERS[t] for t in CHECKERS), [t for t in CHECKERS if not ANSWERS[t]]


@pytest.mark.parametrize("task", BY_SPEED)
def test_no_hint_prints_a_line_of_the_solution(task, capsys, monkeypatch):
    """On the stub and on a plausible wrong answer, first failure, asked-for hints and repeated failures."""
    monkeypatch.setattr(course.checks.common, "FAILURES", {})
    check, wrong = CHECKERS[task], WRONG[task][0]
    outputs = [_failure_output(check, STUBS[task], capsys), _failure_output(check, wrong, capsys),
               _failure_output(check, wrong, capsys, hint=2)]
    outputs += [_failure_output(check, wrong, capsys) for _ in range(course.checks.common.CODE_HINTS_AFTER)]
    outputs += [_failure_output(check, _off_by_a_bit(SOLVED[task]), capsys, hint=h) for h in (1, 2)]
    first, asked, repeated = outputs[1], outputs[2], outputs[2 + course.checks.common.CODE_HINTS_AFTER]
    for out in outputs:
        leaked = _leaks(out, ANSWERS[task])
        assert not leaked, f"check_{task} prints a line of the solution: {leaked}\n{out}"
    assert "code hint:" not in first, f"a first failure gives concepts only:\n{first}"
    if "code hint:" in asked:
        assert "hint=2" in first, "a first failure says how to ask for the code-level hint"
        assert "code hint:" in repeated, f"after {course.checks.common.CODE_HINTS_AFTER} failures the code hint shows"


def test_a_pass_resets_the_failure_count_and_hint_levels_are_checked(monkeypatch):
    monkeypatch.setattr(course.checks.common, "FAILURES", {})
    for _ in range(2):
        with pytest.raises(CheckError):
            course.check_add_noise(WRONG["add_noise"][0])
    assert course.checks.common.FAILURES["add_noise"] == 2
    course.check_add_noise(SOLVED["add_noise"])
    assert course.checks.common.FAILURES["add_noise"] == 0
    with pytest.raises(ValueError, match="hint=3"):
        course.check_add_noise(SOLVED["add_noise"], hint=3)
