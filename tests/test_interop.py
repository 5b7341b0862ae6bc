"""tld.interop's diffusers DiT in and out, on tiny random models built from a config (no download)."""

import pytest
import torch

from tld.interop import load_diffusers_dit, to_diffusers_dit
from tld.models import DiT, count_on_meta, count_parameters

diffusers = pytest.importorskip("diffusers")


def tiny_diffusers_dit(seed=0, learned_sigma=True, tie=False, num_classes=10):
    torch.manual_seed(seed)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                         out_channels=8 if learned_sigma else 4, num_layers=3, sample_size=8,
                                         patch_size=2, num_embeds_ada_norm=num_classes).eval()
    with torch.no_grad():
        for p in tr.parameters():  # random everywhere, so no zero-init hides a mapping mistake
            p.add_(0.2 * torch.randn_like(p))
        if tie:  # the converted official weights hold one embedder copied into every block
            shared = tr.transformer_blocks[0].norm1.emb.state_dict()
            for blk in tr.transformer_blocks[1:]:
                blk.norm1.emb.load_state_dict(shared)
    return tr


def tiny_tld_dit(seed=0, per_block=False, num_classes=10, learn_sigma=True):
    torch.manual_seed(seed)
    model = DiT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=3, num_heads=2, num_classes=num_classes,
                learn_sigma=learn_sigma, per_block_embedders=per_block)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not the fixed sin-cos position table
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def inputs(n=3, num_classes=10):
    torch.manual_seed(1)
    return torch.randn(n, 4, 8, 8), torch.tensor([0, 517, 999, 250][:n]), torch.tensor([1, 9, num_classes, 4][:n])


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_shared_embedders_load_into_one_embedder_with_timestep_over_1000(learned_sigma):
    tr = tiny_diffusers_dit(learned_sigma=learned_sigma, tie=True)
    model = load_diffusers_dit(tr)
    assert not model.per_block_embedders
    x, timestep, y = inputs()  # label 10 is the null class
    with torch.no_grad():
        want = tr(x, timestep=timestep, class_labels=y).sample
        got = model(x, timestep / 1000, y)
    assert want.shape == (3, 8 if learned_sigma else 4, 8, 8)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_diffusers_dit_with_its_own_untied_embedders_loads_exactly():
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                         num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    emb = [b.norm1.emb.state_dict() for b in tr.transformer_blocks]
    assert not torch.equal(emb[0]["timestep_embedder.linear_1.weight"], emb[1]["timestep_embedder.linear_1.weight"])
    assert not torch.equal(emb[1]["class_embedder.embedding_table.weight"], emb[2]["class_embedder.embedding_table.weight"])
    with torch.no_grad():  # move every weight (nothing is tied): a zero-initialised part would hide a mistake
        for p in tr.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = load_diffusers_dit(tr)
    assert model.per_block_embedders
    x, timestep, y = inputs()
    with torch.no_grad():
        want = tr(x, timestep=timestep, class_labels=y).sample
        got = model(x, timestep / 1000, y)
        shared = load_diffusers_dit(tiny_diffusers_dit(tie=True))(x, timestep / 1000, y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - shared).abs().max() > 1e-2  # the per-block embedders are really used
    assert count_parameters(model) == count_parameters(tr) + model.pos_embed.numel()


def test_per_block_embedders_leave_the_presets_counts_and_defaults_alone():
    assert count_on_meta("dit-xl/2") == 675_129_632
    assert count_on_meta("dit-s/2") == 32_963_360
    one, many = tiny_tld_dit(), tiny_tld_dit(per_block=True)
    extra = 2 * (count_parameters(one.t_embedder) + count_parameters(one.y_embedder))  # blocks 1 and 2
    assert count_parameters(many) == count_parameters(one) + extra
    with pytest.raises(ValueError, match="per_block_embedders needs conditioning='adaln-zero'"):
        DiT(img_size=8, embed_dim=32, depth=2, num_heads=2, conditioning="in-context", per_block_embedders=True)


@pytest.mark.parametrize("per_block", [False, True])
def test_to_diffusers_dit_gives_equal_outputs_and_comes_back(per_block, tmp_path):
    model = tiny_tld_dit(per_block=per_block)
    tr = to_diffusers_dit(model)
    x, timestep, y = inputs()
    with torch.no_grad():
        want = model(x, timestep / 1000, y)
        got = tr(x, timestep=timestep, class_labels=y).sample
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tr.save_pretrained(tmp_path)  # records tld's frequency shift 0, which diffusers' config cannot hold
    back = load_diffusers_dit(tmp_path)
    assert back.per_block_embedders == per_block and back.t_embedder.freq_shift == 0
    with torch.no_grad():
        torch.testing.assert_close(back(x, timestep / 1000, y), want, atol=1e-5, rtol=1e-5)


def test_to_diffusers_dit_of_an_unconditional_dit_and_refusals():
    model = tiny_tld_dit(num_classes=0, learn_sigma=False)
    tr = to_diffusers_dit(model)
    x, timestep, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(tr(x, timestep=timestep, class_labels=torch.zeros(3, dtype=torch.long)).sample,
                                   model(x, timestep / 1000), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adaLN-Zero"):
        to_diffusers_dit(DiT(img_size=8, embed_dim=32, depth=1, num_heads=2, conditioning="in-context"))
    with pytest.raises(TypeError, match="converts a tld DiT"):
        to_diffusers_dit(torch.nn.Linear(2, 2))


def test_a_tld_dit_samples_through_diffusers_dit_pipeline():
    """DiTPipeline + a diffusers scheduler + a tiny AutoencoderKL, against the same loop run on the tld model."""
    model = tiny_tld_dit(num_classes=1000)  # DiTPipeline guides against label 1000
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  layers_per_block=1, norm_num_groups=4, sample_size=8).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    pipe = diffusers.DiTPipeline(transformer=to_diffusers_dit(model), vae=vae, scheduler=scheduler)
    labels, steps, w = [3, 999], 6, 4.0
    images = pipe(class_labels=labels, guidance_scale=w, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images

    # the same sampling with the tld model called at t = timestep / 1000
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    ref.set_timesteps(steps)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor(labels + [1000, 1000])
    with torch.no_grad():
        for t in ref.timesteps:
            out = model(torch.cat([z, z]), torch.full((4,), float(t)) / 1000, y)[:, :4]
            cond, uncond = out.chunk(2)
            z = ref.step(uncond + w * (cond - uncond), t, z).prev_sample
        want = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    torch.testing.assert_close(images, want, atol=1e-4, rtol=1e-4)


def test_load_diffusers_dit_from_a_saved_folder_and_missing_folders(tmp_path):
    tr = tiny_diffusers_dit(seed=1)
    tr.save_pretrained(tmp_path / "transformer")
    model = load_diffusers_dit(tmp_path)  # a pipeline-style folder with transformer/
    x, ts, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, ts / 1000, y), tr(x, timestep=ts, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no DiT folder"):
        load_diffusers_dit(tmp_path / "missing")
