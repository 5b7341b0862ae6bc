"""tld.interop.official: the released U-ViT, DiT, U-DiT and TLD checkpoints' layouts, on synthetic state dicts.

No weights are downloaded: the released sizes are checked on the meta device against the facts table
(tld/interop/KEYS.md, made from the reference code's own state_dict()), and small models of each
family's reference layout are loaded, converted and compared.
"""

import argparse
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import tld.interop
from tld.interop import (
    OFFICIAL,
    check_layout,
    identify,
    load_official,
    official_sample_or_explain,
    official_shapes,
    read_state_dict,
    to_official,
)
from tld.interop.official import _CLASSES

KEYS_MD = Path(tld.interop.__file__).with_name("KEYS.md")

SMALL = {  # the released files' structures at test size
    "uvit-class": ("uvit", dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2,
                                num_classes=10, conv=False)),
    "uvit-pixels": ("uvit", dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, conv=True)),
    "uvit-text": ("uvit", dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, text_dim=12,
                               text_len=5, conv=True)),
    "dit": ("dit", dict(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)),
    "udit": ("udit", dict(img_size=16, in_chans=4, embed_dim=16, num_heads=2, depth=(1, 1, 1, 1, 1), num_classes=10)),
    "udit-merged": ("udit", dict(img_size=16, in_chans=4, embed_dim=16, num_heads=2, depth=(1, 1, 1, 1, 1),
                                 num_classes=10, rep=False)),  # the reference's rep=0 FFN
    "tld-released": ("tld", dict(img_size=8, patch_size=2, in_chans=4, embed_dim=256, depth=2, head_dim=64, cross_heads=2,
                                 noise_embed_dim=16, text_dim=12, norm="post", attn_proj=False, final_norm=False)),
    "tld-current": ("tld", dict(img_size=8, patch_size=2, in_chans=4, embed_dim=128, depth=2, head_dim=64, cross_heads=2,
                                noise_embed_dim=16, text_dim=12, norm="pre", attn_proj=False, final_norm=False)),
}


def synthetic_official(shapes: dict, seed=0) -> dict:
    """Random tensors in an official layout (the two TLD buffers hold their fixed values)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}
    if "denoiser_trans_block.precomputed_pos_enc" in sd:
        sd["denoiser_trans_block.precomputed_pos_enc"] = torch.arange(shapes["denoiser_trans_block.precomputed_pos_enc"][0])
        n = shapes["fourier_feats.0.angular_speeds"][0]
        sd["fourier_feats.0.angular_speeds"] = 2 * torch.pi * torch.exp(torch.linspace(0, torch.log(torch.tensor(1000.)), n))
    return sd


def small_official(name, seed=0):
    fam, kw = SMALL[name]
    with torch.device("meta"):
        shapes = official_shapes(_CLASSES[fam](**kw))
    return fam, kw, synthetic_official(shapes, seed)


def inputs(model, n=3):
    torch.manual_seed(3)
    x = torch.randn(n, model.in_chans, model.img_size, model.img_size)
    if getattr(model, "text_dim", 0):
        cond = torch.randn(n, model.text_len, model.text_dim) if hasattr(model, "text_len") else torch.randn(n, model.text_dim)
    elif model.num_classes:
        cond = torch.tensor([0, 3, model.num_classes][:n])
    else:
        cond = None
    return x, torch.tensor([0.001, 0.5, 0.999][:n]), cond


# --- the facts table --------------------------------------------------------------------------


def parse_keys_md(text: str) -> dict[str, dict[str, tuple]]:
    """{official file name: {key: shape}} from KEYS.md's key tables ({i} expanded, '-' skipped)."""
    out = {}
    for table in re.split(r"\n(?=\| key \|)", text)[1:]:
        lines = table.split("\n\n")[0].split("\n")  # the table ends at the first blank line
        names = [c.strip().strip("`") for c in lines[0].strip("|").split("|")][1:]
        for n in names:
            out.setdefault(n, {})
        for ln in lines[2:]:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            key = cells[0].strip("`")
            for name, cell in zip(names, cells[1:]):
                if cell == "-":
                    continue
                m = re.fullmatch(r"([0-9x]+|scalar)(?: \(x(\d+)\))?", cell)
                shape = () if m[1] == "scalar" else tuple(int(d) for d in m[1].split("x"))
                for i in range(int(m[2] or 1)):
                    out[name][key.replace("{i}", str(i))] = shape
    return out


def test_the_facts_table_matches_official_shapes_for_every_released_file():
    table = parse_keys_md(KEYS_MD.read_text())
    counts = dict(re.findall(r"^\| `([^`]+)\.pth?` \| [^|]+ \| (\d+) \|", KEYS_MD.read_text(), flags=re.M))
    alias = {"U-DiT-S": "U-DiT-S-400k", "U-DiT-B": "U-DiT-B-400k", "U-DiT-L": "U-DiT-L-400k"}
    assert len(table) == 13
    for name, want in table.items():
        got = official_shapes(alias.get(name, name))
        assert got == want, name
    for spec in OFFICIAL.values():
        if spec.filename:
            assert int(counts[spec.name]) == len(official_shapes(spec)), spec.name
    assert int(counts["DiT-XL-2-256x256"]) == 292 and int(counts["state_dict_378000"]) == 201


@pytest.mark.parametrize("name", [n for n, f in OFFICIAL.items() if f.filename])
def test_each_released_layout_passes_the_check_and_is_identified(name):
    spec = OFFICIAL[name]
    meta = {k: torch.empty(s, device="meta") for k, s in official_shapes(name).items()}
    check_layout(meta, spec)
    same_shapes = {"U-DiT-L-1000k": "U-DiT-L-400k"}  # the same model trained longer
    assert identify(meta, spec.family).name == same_shapes.get(name, name)


# --- synthetic official dicts load, and the round trips are exact ------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_synthetic_official_dicts_load_and_round_trip_exactly(name):
    fam, kw, sd = small_official(name)
    model = load_official(sd, fam, kw)
    x, t, cond = inputs(model)
    with torch.no_grad():
        out = model(x, t, cond)
    assert torch.isfinite(out).all() and out.abs().max() > 1e-3
    back = to_official(model)  # official -> tld -> official
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # tld -> official -> tld, from a tld model with random weights
    torch.manual_seed(5)
    fresh = _CLASSES[fam](**kw)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    again = load_official(to_official(fresh), fam, kw)
    for k, v in fresh.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def reference_tld(sd: dict, x, sigma, text, self_heads: int, cross_heads: int, legacy: bool, patch: int = 2):
    """The TLD reference's forward written out on its own state dict (legacy: post-norm, heads split (d h))."""
    P, D = "denoiser_trans_block.", sd["norm.weight"].shape[0]
    ln = lambda z, name: F.layer_norm(z, z.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    lin = lambda z, name, bias=True: F.linear(z, sd[name + ".weight"], sd.get(name + ".bias") if bias else None)  # noqa: E731
    speeds = sd["fourier_feats.0.angular_speeds"]
    e = torch.cat([torch.sin(speeds * sigma[:, None]), torch.cos(speeds * sigma[:, None])], dim=-1)
    noise = lin(F.gelu(lin(e, "fourier_feats.1")), "fourier_feats.3")
    ctx = ln(torch.stack([noise, lin(text, "label_proj")], dim=1), "norm")
    h = F.conv2d(x, sd[P + "patchify_and_embed.0.weight"], sd[P + "patchify_and_embed.0.bias"], stride=patch)
    side = h.shape[-1]
    h = ln(lin(ln(h.flatten(2).transpose(1, 2), P + "patchify_and_embed.2"), P + "patchify_and_embed.3"),
           P + "patchify_and_embed.4")
    h = h + sd[P + "pos_embed.weight"]
    split = "b n (d h) -> b h n d" if legacy else "b n (h d) -> b h n d"
    merge = "b h n d -> b n (d h)" if legacy else "b h n d -> b n (h d)"

    def mha(q, k, v, heads):
        q, k, v = (rearrange(z, split, h=heads) for z in (q, k, v))
        return rearrange(F.scaled_dot_product_attention(q, k, v), merge)

    def attn(z, B):
        return mha(*F.linear(z, sd[B + "self_attention.qkv_linear.weight"]).chunk(3, -1), self_heads)

    def cross(z, B):
        return mha(F.linear(z, sd[B + "cross_attention.q_linear.weight"]),
                   *F.linear(ctx, sd[B + "cross_attention.kv_linear.weight"]).chunk(2, -1), cross_heads)

    def mlp(z, B):
        g = rearrange(z, "b (h w) d -> b d h w", h=side)
        g = F.conv2d(g, sd[B + "mlp.mlp.0.weight"], sd[B + "mlp.mlp.0.bias"])
        g = F.gelu(F.conv2d(g, sd[B + "mlp.mlp.1.weight"], sd[B + "mlp.mlp.1.bias"], padding=1, groups=g.shape[1]))
        return rearrange(F.conv2d(g, sd[B + "mlp.mlp.3.weight"], sd[B + "mlp.mlp.3.bias"]), "b d h w -> b (h w) d")

    i = 0
    while f"{P}decoder_blocks.{i}.norm1.weight" in sd:
        B = f"{P}decoder_blocks.{i}."
        if legacy:
            h = ln(attn(h, B) + h, B + "norm1")
            h = ln(cross(h, B) + h, B + "norm2")
            h = ln(mlp(h, B) + h, B + "norm3")
        else:
            h = attn(ln(h, B + "norm1"), B) + h
            h = cross(ln(h, B + "norm2"), B) + h
            h = mlp(ln(h, B + "norm3"), B) + h
        i += 1
    out = lin(h, P + "out_proj.0")
    return rearrange(out, "b (h w) (c p1 q) -> b c (h p1) (w q)", h=side, p1=patch, q=patch), D


@pytest.mark.parametrize("name", ["tld-released", "tld-current"])
def test_tld_matches_the_references_forward_head_order_and_output_channels(name):
    fam, kw, sd = small_official(name, seed=2)
    model = load_official(sd, fam, kw)
    x, sigma, text = inputs(model)
    with torch.no_grad():
        want, dim = reference_tld(sd, x, sigma, text, dim_heads := kw["embed_dim"] // 64, kw["cross_heads"],
                                  legacy=kw["norm"] == "post")
        got = model(x, sigma, text)
    assert dim_heads == model.blocks[0].attn.num_heads
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_released_tld_layout_needs_nested_head_counts():
    fam, kw = SMALL["tld-released"]
    with pytest.raises(ValueError, match="one head count must divide the other"):
        official_shapes(_CLASSES[fam](**{**kw, "embed_dim": 192, "cross_heads": 2}))


# --- wrong family, wrong size, wrong keys -------------------------------------------------------


def test_a_checkpoint_of_another_family_or_size_fails_with_the_named_key():
    _, _, uvit_sd = small_official("uvit-class")
    with pytest.raises(ValueError, match=r"not the dit layout of custom: key 'pos_embed' has shape \[1, 18, 32\], "
                                         r"expected \[1, 16, 32\] \(31 missing"):
        load_official(uvit_sd, "dit", SMALL["dit"][1])  # DiT's first key; then x_embedder.proj.weight is missing
    meta = lambda name: {k: torch.empty(s, device="meta") for k, s in official_shapes(name).items()}  # noqa: E731
    with pytest.raises(ValueError, match=r"key 'pos_embed' has shape \[1, 256, 1152\], expected \[1, 1024, 1152\]"):
        load_official(meta("DiT-XL-2-256x256"), "dit", "DiT-XL-2-512x512")
    with pytest.raises(ValueError, match="matches no official dit file.*it matches uvit imagenet256_uvit_huge"):
        load_official(meta("imagenet256_uvit_huge"), "dit")
    with pytest.raises(ValueError, match=r"key 'patch_embed\.proj\.weight' has shape \[1024, 4, 2, 2\], expected "
                                         r"\[1152, 4, 2, 2\] \(96 missing, 258 of the wrong shape, 2 unexpected"):
        load_official(meta("imagenet256_uvit_large"), "uvit", "uvit-h/2")  # a tld preset naming the H/2 file
    fam, kw, sd = small_official("udit")
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        load_official(sd, fam, kw)
    with pytest.raises(ValueError, match="unknown family"):
        load_official(sd, "unet", kw)
    with pytest.raises(ValueError, match="unknown official preset 'DiT-XXL'"):
        load_official(sd, "dit", "DiT-XXL")


def test_to_official_refuses_what_the_reference_cannot_express():
    with pytest.raises(ValueError, match="per_block_embedders"):
        to_official(_CLASSES["dit"](**SMALL["dit"][1], per_block_embedders=True))
    with pytest.raises(ValueError, match="skip='add'"):
        to_official(_CLASSES["uvit"](**SMALL["uvit-class"][1] | dict(skip="add")))
    with pytest.raises(TypeError, match="no official layout"):
        to_official(torch.nn.Linear(2, 2))


# --- files: safetensors, safe pickles, refused pickles ------------------------------------------


def test_files_load_safely_and_unsafe_pickles_are_refused_with_a_message(tmp_path):
    fam, kw, sd = small_official("dit")
    torch.save(sd, tmp_path / "plain.pt")  # DiT's released files: a state dict
    torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "opt": {"step": torch.tensor(3)}}, tmp_path / "ckpt.pt")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    want = load_official(sd, fam, kw).state_dict()
    for name in ("plain.pt", "ckpt.pt", "w.safetensors"):
        got = load_official(tmp_path / name, fam, kw).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    torch.save({"ema": sd, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "train.pt")  # DiT's train.py
    with pytest.raises(ValueError, match=r"torch\.load\(weights_only=True\).*does not unpickle arbitrary objects"):
        read_state_dict(tmp_path / "train.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_state_dict(tmp_path / "missing.pt")


# --- the lessons' cell --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10_uvit_small", "DiT-XL-2-256x256", "state_dict_378000", "U-DiT-L-1000k"])
def test_the_lesson_cell_skips_fast_saying_which_file_from_where(name, tmp_path, capsys):
    start = time.perf_counter()
    out = official_sample_or_explain(name, path=tmp_path / "absent.pt", device="cpu")
    took = time.perf_counter() - start
    msg = capsys.readouterr().out
    assert out is None and took < 1.0
    spec = OFFICIAL[name]
    assert msg.startswith(f"skipping the official {name} cell: no GPU here")
    assert spec.filename in msg and spec.source in msg and str(tmp_path / "absent.pt") in msg
    out = official_sample_or_explain(name, path=tmp_path / "absent.pt", device="cpu", require_gpu=False)
    assert out is None and f"no file at {tmp_path / 'absent.pt'}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_lesson_cell_samples_every_recipe_with_small_stand_ins():
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    stand_ins = {
        "cifar10_uvit_small": load_official(small_official("uvit-pixels")[2], "uvit", SMALL["uvit-pixels"][1]),
        "DiT-XL-2-256x256": _CLASSES["dit"](**SMALL["dit"][1] | dict(num_classes=1000)),
        "U-DiT-L-1000k": _CLASSES["udit"](**SMALL["udit"][1] | dict(num_classes=1000)),
        "state_dict_378000": load_official(small_official("tld-released")[2], "tld", SMALL["tld-released"][1]),
    }
    for name, model in stand_ins.items():
        images = official_sample_or_explain(name, model=model, vae=vae, text_encoder=lambda p: torch.randn(len(p), 12),
                                            device="cpu", require_gpu=False, steps=3, n=2)
        side = model.img_size
        assert images.shape == (2 if name != "cifar10_uvit_small" else 2, 3, side, side), name
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1, name
