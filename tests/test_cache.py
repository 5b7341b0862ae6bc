"""Claims of tld.cache: latents and text embeddings are computed once, read back memory-mapped
and equal to encoding on the fly; the key changes whenever an encoder or the dataset changes."""

import copy

import numpy as np
import pytest
import torch

from tld.autoencoder import DiffusersVAE, IdentityCodec, tiny_vae_config
from tld.cache import CachedDataset, build_cache, cache_key
from tld.data import ShapesDataset
from tld.text import TinyCLIP, shapes_captions, train_bpe_tokenizer


@pytest.fixture(scope="module")
def encoders():
    """Shared by the module: tests must not change them (copy first), so any order gives the same results."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    codec = DiffusersVAE(AutoencoderKL(**tiny_vae_config()), scale=0.5)
    text = TinyCLIP(train_bpe_tokenizer(shapes_captions(n=300)), dim=16, width=16, depth=1, image_width=8).eval()
    return codec, text


@torch.no_grad()
def test_cache_holds_what_the_encoders_give_memory_mapped(encoders, tmp_path):
    codec, text = encoders
    ds = ShapesDataset(size=32, seed=3, length=1000)
    folder = build_cache(ds, tmp_path, codec=codec, text_encoder=text, n=40, batch_size=16, tokens=True)
    cached = CachedDataset(folder)
    assert len(cached) == 40
    assert isinstance(cached.arrays["latents"], np.memmap)
    b = ds.batch(range(40))
    torch.testing.assert_close(torch.stack([cached[i]["image"] for i in range(40)]), codec.encode(b["image"]))
    pooled, tokens, mask = text.encode(b["caption"])
    item = cached[17]
    torch.testing.assert_close(item["pooled"], pooled[17])
    torch.testing.assert_close(item["tokens"], tokens[17])
    assert (item["mask"] == mask[17]).all()
    assert item["caption"] == b["caption"][17] and item["label"] == int(b["label"][17])


def test_cache_is_reused_not_rebuilt(encoders, tmp_path):
    ds = ShapesDataset(size=16, seed=0, length=100)
    folder = build_cache(ds, tmp_path, n=10)
    stamp = (folder / "latents.npy").stat().st_mtime_ns
    assert build_cache(ds, tmp_path, n=10) == folder
    assert (folder / "latents.npy").stat().st_mtime_ns == stamp
    # without a codec the 'latents' are the images themselves
    torch.testing.assert_close(CachedDataset(folder)[3]["image"], ds[3]["image"])


def test_changed_encoder_or_dataset_changes_the_key(encoders):
    # copies: this test nudges a weight and a scale, and the fixture is shared by the whole module
    codec, text = (copy.deepcopy(e) for e in encoders)
    ds = ShapesDataset(size=32, seed=0)
    key = cache_key(ds, 100, codec, text)
    assert cache_key(ds, 100, codec, text) == key
    assert cache_key(ShapesDataset(size=32, seed=1), 100, codec, text) != key
    assert cache_key(ShapesDataset(size=32, seed=0, background=(0, 0, 0)), 100, codec, text) != key
    assert cache_key(ds, 101, codec, text) != key
    assert cache_key(ds, 100, IdentityCodec(), text) != key
    assert cache_key(ds, 100, codec, None) != key
    # same classes and configs, one weight nudged: a retrained encoder never reads the old cache
    with torch.no_grad():
        next(text.parameters()).view(-1)[0] += 1e-3
    assert cache_key(ds, 100, codec, text) != key
    codec.scale = 0.25
    assert cache_key(ds, 100, codec, None) != cache_key(ds, 100, DiffusersVAE(codec.vae, 0.5), None)
    assert cache_key(ds, 100, *encoders) == key, "the module's shared encoders were changed"


def test_unfinished_cache_is_refused(tmp_path):
    folder = build_cache(ShapesDataset(size=16, seed=0, length=100), tmp_path, n=5)
    (folder / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        CachedDataset(folder)
    with pytest.raises(ValueError, match="n=500"):
        build_cache(ShapesDataset(size=16, seed=0, length=100), tmp_path, n=500)
