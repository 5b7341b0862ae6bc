"""DiT (tld/models/dit.py) and the adaLN-Zero block (tld/blocks.py): the claims of lesson 05."""

from pathlib import Path

import pytest
import torch

import tld.models
from tld.blocks import AdaLNZeroBlock, modulate
from tld.models import count_on_meta, create
from tld.models.dit import DiT, dit_timestep_embedding


@pytest.mark.parametrize("name, expected", [("dit-s/2", 32_963_360), ("dit-b/2", 130_512_416),
                                            ("dit-l/2", 458_102_816), ("dit-xl/2", 675_129_632)])
def test_dit_presets_have_the_papers_parameter_counts(name, expected):
    assert count_on_meta(name) == expected


def test_dit_pos_embed_is_frozen_and_counted():
    with torch.device("meta"):
        model = create("dit-s/2")
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.shape == (1, 256, 384)


def test_modulate_with_zero_shift_and_scale_is_identity():
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(modulate(x, torch.zeros(2, 8), torch.zeros(2, 8)), x)
    out = modulate(x, torch.ones(2, 8), torch.ones(2, 8))
    torch.testing.assert_close(out, 2 * x + 1)


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    blk = AdaLNZeroBlock(32, 4)
    x, c = torch.randn(3, 10, 32), torch.randn(3, 32)
    assert torch.equal(blk(x, c), x)
    # and it stops being the identity once the modulation is trained away from zero
    torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    assert not torch.allclose(blk(x, c), x)


def test_every_block_of_dit_is_identity_at_init():
    torch.manual_seed(0)
    model = create("dit-course")
    x = torch.randn(2, 128 // 2, 128)
    c = torch.randn(2, 128)
    for blk in model.blocks:
        assert torch.equal(blk(x, c), x)


@pytest.mark.parametrize("conditioning", ["adaln-zero", "in-context"])
def test_dit_output_is_exactly_zero_at_init(conditioning):
    torch.manual_seed(0)
    model = DiT(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                learn_sigma=True, conditioning=conditioning)
    out = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 5]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_dit_learns_a_nonzero_output_after_one_step():
    torch.manual_seed(0)
    model = create("dit-course")
    x, t, y = torch.randn(4, 3, 32, 32), torch.rand(4), torch.randint(0, 19, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x, t, y) - x).pow(2).mean().backward()
    opt.step()
    assert model(x, t, y).abs().max() > 0


def test_dit_label_and_time_change_the_output():
    torch.manual_seed(0)
    model = create("dit-course")
    for p in model.parameters():  # move away from the zero init
        torch.nn.init.normal_(p, std=0.05) if p.requires_grad else None
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 0.5)
    a = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, t, torch.tensor([2, 2])))
    assert not torch.allclose(a, model(x, t * 0.5, torch.tensor([1, 1])))


def test_timestep_embedding_is_cos_then_sin_of_integer_steps():
    t = torch.tensor([0.0, 0.25])
    emb = dit_timestep_embedding(t, 8)
    # the first frequency is 1: cos(250), sin(250) for t = 0.25
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(250.0)))
    torch.testing.assert_close(emb[1, 4], torch.sin(torch.tensor(250.0)))
    assert torch.equal(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_dit_rejects_bad_inputs_with_clear_errors():
    model = create("dit-course")
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 32, 32), torch.rand(1), None)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        DiT(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown DiT conditioning"):
        DiT(conditioning="film")


def test_dit_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create("dit-course", depth=2)
    for blk in model.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, 4])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, y).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_presets_live_in_one_table_and_each_names_its_class():
    # one table in tld/models/__init__.py: the model modules register nothing themselves
    for module in ("uvit", "dit", "udit", "tldnet"):
        source = (Path(tld.models.__file__).parent / f"{module}.py").read_text()
        assert "PRESETS" not in source and "register(" not in source, module
    families = {name: tld.models.family(name) for name in tld.models.PRESETS}
    assert sum(f in ("dit", "udit", "tld") for f in families.values()) == 11
    assert {families[n] for n in ("uvit-s/2", "dit-xl/2", "udit-b", "tld-100m")} == {"uvit", "dit", "udit", "tld"}
    with torch.device("meta"):
        for name, preset in tld.models.PRESETS.items():
            assert type(tld.models.create(name)) is preset.cls, name


def test_dit_xl2_costs_118_6_gmacs_per_forward_as_in_the_paper():
    from tld.models.__main__ import measure

    params, macs = measure("dit-xl/2")
    assert params == 675_129_632
    assert abs(macs / 1e9 - 118.6) / 118.6 < 0.01, macs


def test_models_listing_prints_every_preset(capsys):
    from tld.models.__main__ import main

    assert main(["dit-s/2", "udit-course", "tld-course"]) == 0
    out = capsys.readouterr().out
    assert "32,963,360" in out and "udit-course (merged)" in out and "tld-course" in out
