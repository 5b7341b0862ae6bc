"""Claims of tld.autoencoder: codecs share encode/decode/scale; a small AutoencoderKL trained here
reconstructs shapes; the scale factor gives unit-variance latents; pretrained folders load through
the real diffusers code (tested on a tiny AutoencoderKL built from a config, never a download)."""

import pytest
import torch

from tld import assets
from tld.autoencoder import (
    DiffusersVAE,
    IdentityCodec,
    finetune_decoder,
    latent_scale,
    load_codec,
    main,
    psnr,
    reconstruction_reads,
    tiny_vae_config,
    train_vae,
)
from tld.data import ShapesDataset


@pytest.fixture(scope="session")
def trained():
    """(codec, PSNR of the same net untrained) after a few seconds of training."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    untrained = DiffusersVAE(AutoencoderKL(**tiny_vae_config()), scale=1.0)
    return train_vae(steps=60, batch_size=16, lr=3e-3), untrained


@pytest.fixture(scope="module")
def images():
    return ShapesDataset(size=32, seed=1, length=64).batch(range(64))["image"]


def test_identity_codec_is_pixel_space(images):
    codec = IdentityCodec()
    assert codec.scale == 1.0 and codec.latent_channels == 3
    assert codec.decode(codec.encode(images)) is images


@torch.no_grad()
def test_trained_vae_reconstructs_far_better_than_untrained(trained, images):
    codec, untrained = trained
    after = psnr(codec.decode(codec.encode(images)), images)
    before = psnr(untrained.decode(untrained.encode(images)), images)
    assert after > 15.0 and after > before + 5.0, f"PSNR {before:.1f} dB untrained -> {after:.1f} dB trained"


@torch.no_grad()
def test_vae_compresses_32px_images_12x(trained, images):
    z = trained[0].encode(images)
    assert z.shape == (64, 4, 8, 8)
    assert images[0].numel() / z[0].numel() == 12


@torch.no_grad()
def test_scale_factor_gives_unit_std_latents(trained, images):
    codec = trained[0]
    z = codec.encode(images)   # held-out images: the scale was measured on other renders
    assert 0.85 < z.std().item() < 1.15
    torch.testing.assert_close(latent_scale(codec.vae, images), 1 / (z / codec.scale).std().item(), rtol=1e-5, atol=0)


@torch.no_grad()
def test_diffusers_vae_loads_a_local_folder_and_matches_diffusers(tmp_path, images):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    vae.save_pretrained(tmp_path / "vae")
    codec = DiffusersVAE(str(tmp_path / "vae"), scale=0.18215)
    z = codec.encode(images[:4])
    torch.testing.assert_close(z, vae.encode(images[:4]).latent_dist.mean * 0.18215)
    torch.testing.assert_close(codec.decode(z), vae.decode(z / 0.18215).sample)
    # save_pretrained keeps the scale; load_codec brings back the same codec
    codec.save_pretrained(tmp_path / "saved")
    again = load_codec(tmp_path / "saved")
    assert again.scale == 0.18215
    torch.testing.assert_close(again.encode(images[:4]), z)


def test_diffusers_vae_names_missing_weights(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(**tiny_vae_config()).save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        DiffusersVAE(str(tmp_path / "vae"))


def test_diffusers_vae_hub_id_not_on_disk_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        DiffusersVAE("tld-course/no-such-vae")


def test_vae_rejects_wrong_channels_and_sizes(trained):
    codec = trained[0]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        codec.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        codec.encode(torch.zeros(1, 3, 30, 30))


def test_load_codec_round_trips_identity_and_names_what_it_expected(tmp_path):
    IdentityCodec().save_pretrained(tmp_path / "id")
    assert isinstance(load_codec(tmp_path / "id"), IdentityCodec)
    with pytest.raises(FileNotFoundError, match="tld_codec.json"):
        load_codec(tmp_path / "nothing")


@torch.no_grad()
def _decoder_state(codec):
    return {k: v.clone() for k, v in codec.vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}


def test_finetune_decoder_keeps_every_latent_and_sharpens_the_reconstructions(trained, images):
    codec = trained[0]
    before = _decoder_state(codec)
    tuned = finetune_decoder(codec, steps=60, batch_size=16, lr=3e-3)
    with torch.no_grad():
        # the same latents, bit for bit, and the same scale: a denoiser trained on them needs no retraining
        torch.testing.assert_close(tuned.encode(images), codec.encode(images), rtol=0, atol=0)
        assert tuned.scale == codec.scale
        old, new = psnr(codec.decode(codec.encode(images)), images), psnr(tuned.decode(tuned.encode(images)), images)
    assert new > old + 1.0, f"PSNR {old:.1f} dB -> {new:.1f} dB after 60 decoder steps"
    after = _decoder_state(codec)
    assert all(torch.equal(before[k], after[k]) for k in before), "the codec passed in was modified"
    assert any(not torch.equal(before[k], v) for k, v in _decoder_state(tuned).items())
    assert not any(p.requires_grad for p in tuned.vae.parameters())


def test_finetune_decoder_rejects_a_codec_without_a_decoder_and_zero_steps(trained):
    with pytest.raises(TypeError, match="needs a DiffusersVAE.*got IdentityCodec"):
        finetune_decoder(IdentityCodec())
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        finetune_decoder(trained[0], steps=0)


def test_reconstruction_reads_pass_a_lossless_codec_and_fail_a_blurry_one(trained):
    assert reconstruction_reads(IdentityCodec(), n=60)["strict"] == 1.0
    # 60 steps of training reconstruct the shapes but blur them: the reader says so
    assert reconstruction_reads(trained[0], n=60)["strict"] < 0.5


def test_the_finetune_command_saves_a_loadable_codec_and_names_bad_keys(trained, tmp_path, capsys):
    trained[0].save_pretrained(tmp_path / "src")
    assert main(["finetune-decoder", str(tmp_path / "src"), str(tmp_path / "out"), "steps=3", "batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "before: reconstructions of 300 renders: strict" in out and "saved to" in out
    tuned, x = load_codec(tmp_path / "out"), ShapesDataset(size=32, seed=3, length=4).batch(range(4))["image"]
    with torch.no_grad():
        torch.testing.assert_close(tuned.encode(x), trained[0].encode(x), rtol=0, atol=0)
    assert main(["finetune-decoder", str(tmp_path / "src"), str(tmp_path / "o2"), "step=3"]) == 2
    assert "expected one of steps=" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert main(["finetune-decoder", str(tmp_path / "src"), str(tmp_path / "o2"), "lr=fast"]) == 2
    assert "lr must be float, got 'fast'" in capsys.readouterr().err
    assert main(["finetune-decoder", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    assert "no tld codec in" in capsys.readouterr().err
    assert main(["train"]) == 2 and "usage: python -m tld.autoencoder finetune-decoder" in capsys.readouterr().err


@torch.no_grad()
def test_the_shipped_text_to_image_codec_reconstructs_renders_at_render_precision():
    """shapes-t2i's decoder was fine-tuned for 3,000 steps on its frozen encoder's latents (README)."""
    reads = reconstruction_reads(load_codec(assets.path("shapes-t2i") / "codec"))
    assert reads["shape"] == 1.0 and reads["strict"] >= 0.98 and reads["iou"] > 0.98, reads
