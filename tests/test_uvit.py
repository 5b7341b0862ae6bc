"""Claims of lesson 04: U-ViT makes everything a token and joins shallow to deep blocks by long skips."""

import pytest
import torch
import torch.nn.functional as F

from tld.blocks import ConvMlp, timestep_embedding
from tld.models import count_parameters
from tld.models.uvit import UViT

D = 32


def tiny(**kw) -> UViT:
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=D, depth=4, num_heads=2)
    return UViT(**{**args, **kw})


def inputs(b=2, c=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=g), torch.rand(b, generator=g)


def tokens_entering(model, *args) -> torch.Tensor:
    """The token sequence just before the position embedding is added."""
    seen = []
    handle = model.pos_embed.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    with torch.no_grad():
        model(*args)
    handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- tokens

def test_class_model_orders_tokens_label_time_patches():
    model = tiny(num_classes=5).eval()
    x, t = inputs()
    y = torch.tensor([1, 4])
    seq = tokens_entering(model, x, t, y)
    assert seq.shape[1] == 2 + 16
    torch.testing.assert_close(seq[:, 0], model.label_emb(y))
    torch.testing.assert_close(seq[:, 1], timestep_embedding(t, D))
    torch.testing.assert_close(seq[:, 2:], model.patch_embed(x))


def test_text_model_orders_tokens_time_text_patches():
    model = tiny(text_dim=6, text_len=3).eval()
    x, t = inputs()
    text = torch.randn(2, 3, 6)
    seq = tokens_entering(model, x, t, text)
    assert seq.shape[1] == 1 + 3 + 16
    torch.testing.assert_close(seq[:, 0], timestep_embedding(t, D))
    torch.testing.assert_close(seq[:, 1:4], model.context_embed(text))
    torch.testing.assert_close(seq[:, 4:], model.patch_embed(x))


def test_unconditional_model_orders_tokens_time_patches():
    model = tiny().eval()
    x, t = inputs()
    seq = tokens_entering(model, x, t)
    assert seq.shape[1] == 1 + 16
    torch.testing.assert_close(seq[:, 0], timestep_embedding(t, D))


def test_time_token_is_the_raw_sinusoid_with_no_parameters():
    model = tiny()
    assert isinstance(model.time_embed, torch.nn.Identity)
    assert count_parameters(tiny(mlp_time_embed=True)) > count_parameters(model)


def test_position_embedding_covers_the_extra_tokens():
    assert tiny(num_classes=5).pos_embed.weight.shape == (1, 2 + 16, D)
    assert tiny(text_dim=6, text_len=3).pos_embed.weight.shape == (1, 4 + 16, D)


def test_only_the_label_token_sees_the_label():
    # change the label: only token 0 of the sequence entering the blocks changes
    model = tiny(num_classes=5).eval()
    x, t = inputs()
    a = tokens_entering(model, x, t, torch.tensor([0, 0]))
    b = tokens_entering(model, x, t, torch.tensor([3, 3]))
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [True] + [False] * (a.shape[1] - 1)


# --------------------------------------------------------------------------- blocks and skips

@pytest.mark.parametrize("depth", [1, 2, 5, 12, 13, 28])
def test_block_count_is_two_halves_plus_a_middle(depth):
    with torch.device("meta"):
        model = tiny(depth=depth)
    n = len(model.in_blocks) + 1 + len(model.out_blocks)
    assert n == 2 * (depth // 2) + 1
    assert len(model.in_blocks) == len(model.out_blocks) == depth // 2


def test_long_skips_are_last_in_first_out_and_skip_the_middle_block():
    model = tiny(depth=6).eval()
    shallow, received = {}, {}
    handles = []
    for i, blk in enumerate(model.in_blocks):
        handles.append(blk.register_forward_hook(lambda m, inp, out, i=i: shallow.__setitem__(i, out)))
    for j, blk in enumerate(model.out_blocks):
        handles.append(blk.register_forward_pre_hook(lambda m, inp, j=j: received.__setitem__(j, inp[1])))
    handles.append(model.mid_block.register_forward_pre_hook(
        lambda m, inp: received.__setitem__("mid", inp[1] if len(inp) > 1 else None)))
    with torch.no_grad():
        model(*inputs())
    for h in handles:
        h.remove()
    n = len(model.in_blocks)
    assert n == 3
    for j in range(n):  # deep block j gets shallow block n-1-j: the nearest pairs first
        assert received[j] is shallow[n - 1 - j]
    assert received["mid"] is None


def test_mid_block_has_no_skip_fusion():
    model = tiny(depth=6)
    assert model.mid_block.skip is None and model.mid_block.skip_linear is None
    assert all(b.skip is None for b in model.in_blocks)
    assert all(b.skip == "concat" for b in model.out_blocks)


def test_skip_kinds_change_the_parameter_count_by_the_fusion_linears():
    depth = 6
    none, add, concat = (count_parameters(tiny(depth=depth, skip=s)) for s in (None, "add", "concat"))
    assert add == none  # addition has no weights
    assert concat - none == (depth // 2) * (2 * D * D + D)  # one Linear(2D -> D) per deep block


def test_skip_kinds_give_different_outputs():
    x, t = inputs()
    with torch.no_grad():
        outs = [tiny(skip=s).eval()(x, t) for s in (None, "add", "concat")]
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[1], outs[2])


def test_unknown_skip_kind_raises():
    with pytest.raises(ValueError, match="skip kind 'mul'"):
        tiny(skip="mul")


# --------------------------------------------------------------------------- head and output

@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_output_has_the_input_shape(cond):
    kw = {"none": {}, "class": dict(num_classes=5), "text": dict(text_dim=6, text_len=3)}[cond]
    model = tiny(in_chans=4, **kw).eval()
    x, t = inputs(c=4)
    c = {"none": None, "class": torch.tensor([0, 5]), "text": torch.randn(2, 3, 6)}[cond]
    with torch.no_grad():
        assert model(x, t, c).shape == x.shape


def test_3x3_conv_head_is_present_iff_conv_is_set():
    with_conv, without = tiny(conv=True), tiny(conv=False)
    conv = with_conv.final_layer
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.in_channels == 3
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in without.modules())
    assert count_parameters(with_conv) - count_parameters(without) == 3 * 3 * 9 + 3


def test_scalar_time_is_broadcast_to_the_batch():
    model = tiny().eval()
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(0.3)), model(x, torch.full((2,), 0.3)))


# --------------------------------------------------------------------------- bad inputs

def test_wrong_channels_raise_a_clear_error():
    x, t = inputs(c=4)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 3, 8, 8\], got \(2, 4, 8, 8\)"):
        tiny()(x, t)


def test_wrong_image_size_raises_a_clear_error():
    x, t = inputs(size=16)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\], got \(2, 3, 16, 16\)"):
        tiny()(x, t)


def test_time_of_the_wrong_shape_raises_a_clear_error():
    x, _ = inputs()
    with pytest.raises(ValueError, match=r"expected t of shape \[2\].*got \(3,\)"):
        tiny()(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"expected t of shape \[2\]"):
        tiny()(x, torch.rand(2, 1))


def test_class_model_without_labels_raises_a_clear_error():
    x, t = inputs()
    with pytest.raises(ValueError, match="class-conditional.*got None"):
        tiny(num_classes=5)(x, t)
    with pytest.raises(ValueError, match=r"class-conditional.*got \(3,\)"):
        tiny(num_classes=5)(x, t, torch.tensor([0, 1, 2]))


def test_text_model_with_wrong_text_shape_raises_a_clear_error():
    x, t = inputs()
    with pytest.raises(ValueError, match=r"text tokens \[B, 3, 6\], got \(2, 3, 5\)"):
        tiny(text_dim=6, text_len=3)(x, t, torch.randn(2, 3, 5))


def test_image_size_not_divisible_by_patch_raises_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        UViT(img_size=30, patch_size=4, embed_dim=D, depth=2, num_heads=2)


def test_class_and_text_together_raise():
    with pytest.raises(ValueError, match="not both"):
        tiny(num_classes=5, text_dim=6)


# --------------------------------------------------------------------------- equivalences

def _loss_and_grads(model, x, t, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, t, y).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny(num_classes=5, depth=4).train()
    x, t = inputs()
    y = torch.tensor([1, 2])
    loss_a, grads_a = _loss_and_grads(model, x, t, y)
    model.gradient_checkpointing = True
    loss_b, grads_b = _loss_and_grads(model, x, t, y)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-6, msg=name)


def test_math_and_sdpa_attention_backends_agree():
    x, t = inputs()
    y = torch.tensor([1, 2])
    with torch.no_grad():
        a = tiny(num_classes=5, attn_backend="math").eval()(x, t, y)
        b = tiny(num_classes=5, attn_backend="sdpa").eval()(x, t, y)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_conv_mlp_variant_runs_and_trains_its_depthwise_conv():
    model = tiny(num_classes=5, conv_mlp=True).train()
    mlps = [m for m in model.modules() if isinstance(m, ConvMlp)]
    assert len(mlps) == 2 * (4 // 2) + 1
    assert all(m.n_extra == 2 and m.grid == (4, 4) for m in mlps)
    x, t = inputs()
    out = model(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(m.dwconv.weight.grad.abs().sum() > 0 for m in mlps)


def test_class_conditional_model_gives_different_outputs_for_different_labels():
    model = tiny(num_classes=5).eval()
    x, t = inputs()
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([3, 3]))
        null = model(x, t, torch.tensor([model.null_class] * 2))  # the null class is a valid label
    assert (a - b).abs().max() > 1e-4
    assert (a - null).abs().max() > 1e-4


def test_tiny_uvit_overfits_a_single_batch():
    torch.manual_seed(0)
    model = tiny(num_classes=5, depth=2).train()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g)
    y, target = torch.tensor([0, 1, 2, 3]), torch.randn(4, 3, 8, 8, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


NO_NULL = "built with class_dropout_null=False: it has no null class"


def test_a_uvit_without_a_null_class_says_so_wherever_the_null_class_is_needed(tmp_path):
    """class_dropout_null=False gives the label table no extra row. Label num_classes would then be an
    IndexError deep in nn.Embedding; every path that needs the null class raises this ValueError instead."""
    from tld.samplers import generate
    from tld.train import config_from_args, train

    model = tiny(num_classes=5, class_dropout_null=False).eval()
    assert model.label_emb.num_embeddings == 5
    labels = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=NO_NULL):
        _ = model.null_class
    with pytest.raises(ValueError, match=NO_NULL):
        model.null_condition(labels)
    with pytest.raises(ValueError, match=NO_NULL):
        model.drop_condition(labels, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=NO_NULL):   # guidance needs the null class
        generate(model, "vp-cosine", prediction="eps", cond=labels, steps=2, guidance=3.0)
    # without guidance it samples: the model works, only the null class is missing
    assert generate(model, "vp-cosine", prediction="eps", cond=labels, steps=2).shape == (2, 3, 8, 8)

    def run(name, *args):
        return config_from_args(["preset=smoke", f"out_dir={tmp_path / name}", "progress=false", "max_steps=2",
                                 "model.class_dropout_null=false", *args])

    # label dropout, or guided sample grids, need it: the run stops before its first step
    for name, args in (("dropout", ["class_dropout=0.1"]), ("guided", ["class_dropout=0", "sample_guidance=3"])):
        with pytest.raises(ValueError, match=NO_NULL):
            train(run(name, *args))
        assert not (tmp_path / name / "checkpoints").exists(), name
    # with neither, such a model trains (no null condition is ever drawn)
    assert train(run("plain", "class_dropout=0", "sample_guidance=1"))["steps"] == 2
