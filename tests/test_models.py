"""Claims of the model registry: every preset builds (on meta too), the papers' sizes are exact."""

import pytest
import torch

from tld.models import PRESETS, count_on_meta, count_parameters, create

# Presets small enough to run a real forward pass on a CPU in a test.
SMALL = 5_000_000


def _cond_for(model, batch: int):
    """The `cond` a model expects, read from the attributes every tld model exposes."""
    if getattr(model, "num_classes", 0):
        return torch.arange(batch) % model.num_classes
    text_dim = getattr(model, "text_dim", 0)
    if text_dim:
        text_len = getattr(model, "text_len", None)
        shape = (batch, text_len, text_dim) if text_len else (batch, text_dim)
        return torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = create(name)
    params = list(model.parameters())
    assert params, f"{name} has no parameters"
    assert all(p.is_meta for p in params)
    for attr in ("img_size", "in_chans", "num_classes", "gradient_checkpointing"):
        assert hasattr(model, attr), f"{name} lacks the attribute {attr!r} the trainer relies on"


def test_unknown_preset_raises_value_error_listing_available_names():
    with pytest.raises(ValueError) as info:
        create("uvit-gigantic")
    message = str(info.value)
    assert "uvit-gigantic" in message
    for name in PRESETS:
        assert name in message


def test_uvit_s2_has_the_papers_44_255_328_parameters():
    assert count_on_meta("uvit-s/2") == 44_255_328


def test_uvit_h2_has_the_papers_500_832_016_parameters():
    assert count_on_meta("uvit-h/2") == 500_832_016


def test_count_on_meta_equals_counting_a_real_model():
    torch.manual_seed(0)
    assert count_on_meta("uvit-tiny") == count_parameters(create("uvit-tiny"))


def test_overrides_replace_preset_arguments():
    preset_depth = PRESETS["uvit-tiny"].kwargs["depth"]
    base = create("uvit-tiny")
    deeper = create("uvit-tiny", depth=6, embed_dim=64)
    assert len(base.out_blocks) == preset_depth // 2
    assert len(deeper.in_blocks) == len(deeper.out_blocks) == 3
    assert deeper.embed_dim == 64
    assert count_parameters(deeper) > count_parameters(base)
    # the registry itself is untouched by an override
    assert PRESETS["uvit-tiny"].kwargs["depth"] == preset_depth


def test_override_with_unknown_argument_raises():
    with pytest.raises(TypeError):
        create("uvit-tiny", not_an_argument=3)


SMALL_PRESETS = [name for name in sorted(PRESETS) if count_on_meta(name) < SMALL]


def test_the_course_has_small_presets():
    assert {"uvit-tiny", "uvit-course"} <= set(SMALL_PRESETS)


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_preset_forward_returns_the_input_shape(name):
    torch.manual_seed(0)
    model = create(name).eval()
    b = 2
    x = torch.randn(b, model.in_chans, model.img_size, model.img_size)
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        out = model(x, t, _cond_for(model, b))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
