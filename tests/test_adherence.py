"""Validation of tld.evaluate.shapes_adherence, the yardstick for text-to-image on shapes: real
dataset images read back right (>= 0.99 on each attribute and all three), pure noise at chance."""

import pytest
import torch

from tld.data import ShapesDataset
from tld.evaluate import load_shapes_classifier, shapes_adherence

N = 512
CHANCE = {"shape": 1 / 3, "color": 1 / 6, "position": 1 / 9, "all": 1 / 162}


@pytest.fixture(scope="module")
def classifier():
    return load_shapes_classifier()


@pytest.mark.parametrize("size", [16, 32])
def test_real_images_score_at_least_0_99_on_every_attribute(classifier, size):
    b = ShapesDataset(size=size, seed=123, length=N).batch(range(N))   # held-out seed
    acc = shapes_adherence((b["image"] + 1) / 2, b["caption"], classifier=classifier)
    assert all(acc[k] >= 0.99 for k in ("shape", "color", "position", "all")), acc


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_scores_near_chance(classifier, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        noise = (0.5 + 0.25 * torch.randn(N, 3, 32, 32, generator=g)).clamp(0, 1)
    else:
        noise = torch.rand(N, 3, 32, 32, generator=g)
    captions = ShapesDataset(size=32, seed=7, length=N).batch(range(N))["caption"]   # balanced targets
    acc = shapes_adherence(noise, captions, classifier=classifier)
    # a classifier that guesses one answer for all noise scores the chance rate on balanced captions
    for k, p in CHANCE.items():
        assert acc[k] < p + 0.12 if k != "all" else acc[k] < 0.03, (k, acc)
