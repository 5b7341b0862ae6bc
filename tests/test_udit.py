"""U-DiT (tld/models/udit.py): exact sizes, sub-grid attention, and a pure FFN merge (lesson 11)."""

import pytest
import torch

from tld.models import count_on_meta, count_parameters, create
from tld.models.udit import DownsampledAttention, RepFFN, UDiT, merge_subgrids, rope_2d, split_subgrids

COUNTS = {"udit-s": (58_896_568, 52_045_240), "udit-b": (231_251_304, 204_425_064),
          "udit-l": (916_335_304, 810_188_488)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_udit_presets_count_the_reference_as_trained_and_the_paper_after_merge(name):
    trained, merged = COUNTS[name]
    assert count_on_meta(name) == trained
    with torch.device("meta"):
        assert count_parameters(create(name).merged()) == merged


def _trained_udit(seed=0):
    torch.manual_seed(seed)
    model = UDiT(img_size=16, in_chans=3, embed_dim=16, num_heads=2, depth=(1, 1, 1, 1, 1), num_classes=4,
                 learn_sigma=False)
    with torch.no_grad():  # move every weight away from the (partly zero) init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_merged_udit_output_equals_unmerged():
    model = _trained_udit()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 4])
    with torch.no_grad():
        want = model.eval()(x, t, y)
        got = model.merged()(x, t, y)
    assert want.abs().max() > 1e-3  # a real output, not the zero of the init
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_leaves_training_weights_bit_identical_through_train_eval_train():
    model = _trained_udit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        model(x, t, y)
        merged = model.merged()
    model.train()
    model(x, t, y)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert merged is not model and model.rep and not merged.rep


def _trained_ffn() -> RepFFN:
    """A RepFFN with every branch non-zero, as after training."""
    torch.manual_seed(0)
    ffn = RepFFN(8, 2.0)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0, 0.2)
    return ffn


def test_rep_ffn_merge_is_exact_per_module():
    ffn = _trained_ffn()
    x = torch.randn(2, 8, 6, 6)
    textbook = ffn.forward_branches(x)   # one convolution per branch, as U-DiT writes it
    torch.testing.assert_close(ffn.merged()(x), textbook, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ffn(x), textbook, atol=1e-5, rtol=1e-5)


def test_rep_ffn_folded_training_forward_gives_every_weight_the_branches_gradient():
    ffn = _trained_ffn()
    x, target = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    grads = []
    for forward in (ffn.forward, ffn.forward_branches):
        ffn.zero_grad()
        (forward(x) - target).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in ffn.named_parameters()})
    assert len(grads[0]) == 14 and all(g.abs().max() > 0 for g in grads[1].values())   # 7 convs, each trained
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_subgrid_split_takes_every_second_pixel_and_inverts():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    parts = split_subgrids(x)
    assert parts.shape == (2, 4, 6, 3)
    # sub-grid 1 is (row offset 0, column offset 1): pixels (2i, 2j + 1)
    torch.testing.assert_close(parts[:, 1].transpose(1, 2).reshape(2, 3, 2, 3), x[:, :, 0::2, 1::2])
    torch.testing.assert_close(parts[:, 2].transpose(1, 2).reshape(2, 3, 2, 3), x[:, :, 1::2, 0::2])
    assert torch.equal(merge_subgrids(parts, 4, 6), x)


def test_downsampled_attention_keeps_each_subgrid_separate():
    # changing a pixel of sub-grid (0, 0) before attention leaves the attention of the other
    # sub-grids unchanged, except through the depthwise conv's 5x5 reach: zero that conv to see it
    torch.manual_seed(0)
    attn = DownsampledAttention(8, 2)
    torch.nn.init.zeros_(attn.downsampler.weight)
    torch.nn.init.zeros_(attn.proj.weight)
    torch.nn.init.eye_(attn.proj.weight[:, :, 0, 0])
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    a, b = attn(x), attn(y)
    changed = (a - b).abs().sum(1)[0] > 1e-6
    assert changed[0::2, 0::2].all()
    assert not changed[1::2].any() and not changed[:, 1::2].any()


def test_rope_2d_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    rq, rk = rope_2d(q.expand(1, 16, 8), 4, 4), rope_2d(k.expand(1, 16, 8), 4, 4)
    scores = rq[0] @ rk[0].T  # [16, 16] over a 4x4 grid
    # (row 0, col 0)->(row 1, col 2) and (row 2, col 1)->(row 3, col 3): same offset (1, 2)
    torch.testing.assert_close(scores[0, 1 * 4 + 2], scores[2 * 4 + 1, 3 * 4 + 3])
    assert not torch.allclose(scores[0, 1], scores[0, 4])  # a column step differs from a row step


def test_udit_output_is_exactly_zero_at_init_and_shapes_follow_learn_sigma():
    torch.manual_seed(0)
    model = UDiT(img_size=16, in_chans=4, embed_dim=16, num_heads=2, depth=(1, 1, 1, 1, 1), num_classes=3)
    out = model(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_udit_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 8"):
        UDiT(img_size=20)
    model = create("udit-course")
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([0]))
