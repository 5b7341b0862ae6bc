"""Claims of tld.geometry, the strict reader: it reads real shapes right and passes them, fails deliberately
distorted ones that the shapes classifier accepts, and shares nothing with that classifier."""

import pytest
import torch

from tld.data import SHAPES, ShapesDataset
from tld.geometry import (
    DISTORTIONS,
    distorted_batch,
    fit_shapes,
    geometric_accuracy,
    geometric_reads,
    strict_iou,
)
from tld.judge import shapes_accuracy


@pytest.mark.parametrize("size", [32, 16])
def test_real_renders_are_read_right_and_pass_the_strict_bar(size):
    b = ShapesDataset(size=size, seed=3, length=150).batch(range(150))
    acc = geometric_accuracy(b["image"], b["shape"])
    assert acc["shape"] >= 0.99 and acc["strict"] >= 0.99, acc
    assert acc["iou"] > strict_iou(size) + 0.01


@pytest.mark.parametrize("kind", DISTORTIONS)
def test_distorted_shapes_fail_the_strict_bar(kind):
    x, imitates = distorted_batch(kind, 48, seed=4)
    acc = geometric_accuracy(x, imitates)
    assert acc["strict"] <= 0.15, (kind, acc)


def test_faint_pixel_noise_does_not_change_the_reading_but_a_wrong_outline_still_fails():
    # Gaussian noise of std 0.03 (1.5 % of the range) over the whole image: before the noise floor, the
    # background's noise outweighed the shape's edge and every noisy render failed strict (IoU 0.87)
    g = torch.Generator().manual_seed(8)
    b = ShapesDataset(size=32, seed=8, length=96).batch(range(96))
    noisy = (b["image"] + 0.03 * torch.randn(b["image"].shape, generator=g)).clamp(-1, 1)
    acc = geometric_accuracy(noisy, b["shape"])
    assert acc["shape"] == 1.0 and acc["strict"] >= 0.95 and acc["iou"] > 0.98, acc
    for kind in ("notched square", "rounded square", "blob"):
        x, imitates = distorted_batch(kind, 48, seed=9)
        x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        assert geometric_accuracy(x, imitates)["strict"] <= 0.05, kind


def test_the_classifier_accepts_distortions_that_the_strict_reader_rejects():
    # octagons for circles, rounded squares and lobed blobs: a lenient judge calls most of them right
    for kind in ("octagon circle", "rounded square", "blob"):
        x, imitates = distorted_batch(kind, 48, seed=5)
        lenient = shapes_accuracy(x, imitates, [0] * len(x))["shape"]
        strict = geometric_accuracy(x, imitates)["strict"]
        assert lenient >= 0.7 and strict <= lenient - 0.5, (kind, lenient, strict)


def test_fit_reports_one_iou_per_kind_and_a_perfect_render_fits_its_own_kind_best():
    b = ShapesDataset(size=32, seed=6, length=12).batch(range(12))
    fit = fit_shapes(b["image"])
    assert fit["iou"].shape == (12, len(SHAPES)) and (fit["iou"] <= 1).all()
    own = fit["iou"][torch.arange(12), b["shape"]]
    assert torch.equal(fit["shape"], b["shape"]) and (own > 0.97).all(), own
    assert (fit["wrong_pixels"][torch.arange(12), b["shape"]] <= 2).all()


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fit_shapes(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="unknown distortion"):
        distorted_batch("wobbly")
    with pytest.raises(ValueError, match="2 images but 3"):
        geometric_accuracy(ShapesDataset(size=32).grid(2), [0, 1, 2])


def test_per_image_reads_mark_exactly_the_distorted_images_and_summarise_to_the_accuracy():
    renders = ShapesDataset(size=32, seed=11, length=24).batch(range(24))
    notched, imitates = distorted_batch("notched square", 12, seed=11)
    images = torch.cat([renders["image"], notched])
    shapes = [SHAPES[int(k)] for k in renders["shape"]] + imitates
    reads = geometric_reads(images, shapes)
    assert all(v.shape == (36,) for v in reads.values()), {k: v.shape for k, v in reads.items()}
    assert reads["passed"][:24].all() and not reads["passed"][24:].any(), reads["passed"]
    assert (reads["passed"] <= reads["right"]).all()   # passing asks for the right kind too
    acc = geometric_accuracy(images, shapes)
    assert acc["strict"] == pytest.approx(24 / 36) and acc["shape"] == pytest.approx(reads["right"].float().mean().item())
    assert acc["iou"] == pytest.approx(reads["iou"].mean().item())
