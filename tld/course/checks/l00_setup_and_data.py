"""Checkers of lesson 00, setup and data: the caption parser, a shape's anti-aliased coverage, class coverage."""

from __future__ import annotations

import numpy as np
import torch

from ...data import COLORS, POSITIONS, SHAPES, ShapesDataset, make_caption, parse_caption
from .common import CheckError, _call, _close, _compare, _fail, _ok, _scalar, checker

_BAD = ["a purple hexagon somewhere", "a red circle", "red circle at the top left", "a red circle at the middle",
        "a red blob at the top left", "a red circle near the top left"]
_FORGIVEN = ["A Red Circle at the Top Left", "  a blue square   in the center  ", "a green triangle on the right."]


@checker("parse_caption")
def check_parse_caption(fn) -> None:
    """``fn(caption) -> {'shape', 'color', 'position'}`` like ``tld.data.parse_caption``, and a ValueError for
    any text that ShapesDataset could not have written."""
    every = [make_caption(s, c, p) for s in SHAPES for c in COLORS for p in POSITIONS]
    for caption in every[:1] + _FORGIVEN + every[1:]:
        case = f"caption {caption!r}"
        expected = parse_caption(caption)
        got = _call("parse_caption", fn, case, caption)
        if got == expected:
            continue
        if not isinstance(got, dict):
            _fail("parse_caption", f"returned {type(got).__name__}, expected a dict with keys 'shape', 'color', "
                  f"'position'", case)
        if set(got) != set(expected):
            _fail("parse_caption", f"keys {sorted(got)}, expected {sorted(expected)}", case)
        wrong = {k: got[k] for k in expected if got[k] != expected[k]}
        what = f"got {wrong}, expected {({k: expected[k] for k in wrong})}"
        if "position" in wrong and str(wrong["position"]).split(" ", 2)[-1] == expected["position"]:
            hint = ("the position is its name as in tld.data.POSITIONS ('top left', 'center'), not the phrase "
                    "the caption says it with ('at the top left', 'in the center')")
        elif caption in _FORGIVEN:
            hint = ("tld forgives case, spaces around and between the words, and a final period: normalise the "
                    "caption before reading it", "str.lower, str.strip, str.rstrip, and split() then ' '.join")
        else:
            hint = "read the caption word by word: 'a <color> <shape> <where>', where <where> is a phrase of 3-4 words"
        _fail("parse_caption", what, case, hint)
    for caption in _BAD:
        case = f"caption {caption!r} (ShapesDataset never writes it)"
        try:
            got = fn(caption)
        except ValueError:
            continue
        except NotImplementedError:
            _call("parse_caption", fn, case, caption)
        except Exception as e:
            _fail("parse_caption", f"raised {type(e).__name__}: {e}", case,
                  "a caption that cannot be read is a ValueError that says which part was not understood")
        _fail("parse_caption", f"returned {got!r} instead of raising a ValueError", case,
              ("accept only the colors, shapes and position phrases ShapesDataset uses; anything else is a "
               "ValueError", "check each name against tld.data.COLORS, SHAPES and POSITIONS"))
    _ok("parse_caption", len(every) + len(_FORGIVEN) + len(_BAD), "tld.data.parse_caption (and its ValueErrors)", 0.0)


def _circle_items(size: int, n: int, seed: int):
    ds = ShapesDataset(size=size, seed=seed, shapes=("circle",))
    return ds, [ds.params(i) for i in range(n)]


@checker("circle_coverage")
def check_circle_coverage(fn) -> None:
    """``fn(size, cx, cy, radius) -> [size, size]``: the fraction of each pixel a circle covers, as ShapesDataset
    draws it: the signed distance d from the pixel's centre to the edge, through a one-pixel ramp."""
    worst = 0.0
    for size, seed in ((8, 1), (16, 2), (32, 3)):
        ds, items = _circle_items(size, 3, seed)
        for k, (_, color, _, cx, cy, s) in enumerate(items):
            cx, cy, s = float(cx), float(cy), float(s)
            case = f"size {size}, circle at cx {cx:.3f}, cy {cy:.3f}, radius {s:.3f} (item {k} of a circles dataset)"
            expected = torch.from_numpy(ds._coverage("circle", np.float32(cx), np.float32(cy), np.float32(s)))

            def hint(got, exp, cx=cx, cy=cy, s=s, size=size):
                c = torch.arange(size, dtype=torch.float64)
                d = ((c[None] + 0.5 - cx) ** 2 + (c[:, None] + 0.5 - cy) ** 2).sqrt() - s
                if _close(got, (d <= 0).double(), 1e-4):
                    return ("that is a hard mask: ShapesDataset anti-aliases, a pixel whose centre sits on the edge "
                            "is half covered and the coverage ramps over one pixel")
                if _close(got, (-d).clamp(0, 1), 1e-4) or _close(got, (1 - d).clamp(0, 1), 1e-4):
                    return "centre the ramp on the edge: coverage 1/2 at d = 0, 1 at d = -1/2, 0 at d = +1/2"
                if _close(got.T, exp, 1e-4):
                    return "rows are y and columns are x: the result is indexed [y, x]"
                d0 = ((c[None] - cx) ** 2 + (c[:, None] - cy) ** 2).sqrt() - s
                if _close(got, (0.5 - d0).clamp(0, 1), 1e-4):
                    return "pixel centres: pixel (i, j) covers [j, j+1] x [i, i+1], so its centre is (j + 1/2, i + 1/2)"
                return ("coverage is 1 deep inside, 0 far outside, and a linear ramp one pixel wide centred on the "
                        "circle's edge", "the signed distance of a circle is the distance to its centre minus the "
                        "radius; clamp the ramp to [0, 1]")

            got = _call("circle_coverage", fn, case, size, cx, cy, s)
            worst = max(worst, _compare("circle_coverage", got, expected.double(), case, atol=1e-5, rtol=1e-5,
                                        hint=hint))
            image = ds._bg + ds._delta[color] * got.detach().numpy().astype(np.float32)
            if not np.allclose(image, ds[k]["image"].numpy(), atol=1e-5):
                raise CheckError(f"check_circle_coverage: your coverage does not redraw the dataset's image\n  on {case}")
    _ok("circle_coverage", 9, "ShapesDataset's anti-aliased circles (and redraws their images)", worst)


def _until_every_class(ds) -> int:
    seen, i = set(), 0
    while len(seen) < ds.num_classes:
        shape, color = ds.params(i)[:2]
        seen.add(shape * len(ds.colors) + color)
        i += 1
    return i


COUPON_RANGE = (40, 90)  # mean over seeds 0-7 of items until all 18 classes appeared (18 H_18 = 62.4 expected)


@checker("items_until_every_class")
def check_items_until_every_class(fn) -> None:
    """``fn(dataset) -> int``: how many items, from item 0 on, until every class of the dataset has appeared."""
    cases = [(ShapesDataset(size=8, seed=s, shapes=("circle",)), s) for s in (0, 1)]
    cases += [(ShapesDataset(size=8, seed=s), s) for s in range(8)]
    got_all = []
    for ds, seed in cases:
        case = f"ShapesDataset(size=8, seed={seed}) with {ds.num_classes} classes"
        expected = torch.tensor(float(_until_every_class(ds)), dtype=torch.float64)

        def hint(got, exp):
            if _close(got, exp - 1, 1e-9):
                return ("count the items, not the index of the last one: a dataset whose item 0 alone showed every "
                        "class would answer 1")
            return ("walk the items in order, keep the set of labels seen, stop when it holds every class",
                    "ds.params(i) gives (shape, color, ...) without drawing the image; label = shape * 6 + color")

        got = _scalar("items_until_every_class", _call("items_until_every_class", fn, case, ds), case)
        _compare("items_until_every_class", got, expected, case, atol=0, rtol=0, hint=hint)
        if ds.num_classes == 18:
            got_all.append(got.item())
    mean = float(np.mean(got_all))
    lo, hi = COUPON_RANGE
    if not lo <= mean <= hi:
        raise CheckError(f"check_items_until_every_class: mean over seeds 0-7 is {mean:.1f}, outside the expected "
                         f"range [{lo}, {hi}]")
    _ok("items_until_every_class", len(cases), "a count over ShapesDataset.params", 0.0)
    print(f"  answer: {mean:.1f} items on average over seeds 0-7 (range {min(got_all):.0f}-{max(got_all):.0f}); "
          f"the coupon collector expects 18 H_18 = 62.4: a batch of 64 often misses a class")


__all__ = ["check_circle_coverage", "check_items_until_every_class", "check_parse_caption"]
