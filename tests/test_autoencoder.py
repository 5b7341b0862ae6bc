"""Claims of tld.autoencoder: codecs share encode/decode/scale; a small AutoencoderKL trained here
reconstructs shapes; the scale factor gives unit-variance latents; pretrained folders load through
the real diffusers code (tested on a tiny AutoencoderKL built from a config, never a download)."""

import pytest
import torch

from tld.autoencoder import (
    DiffusersVAE,
    IdentityCodec,
    latent_scale,
    load_codec,
    psnr,
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
