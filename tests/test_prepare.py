"""Claims of tld.prepare: real images -> memory-mapped shards with a manifest, made once, resumable, the same
with 1 or 2 processes; and the trainer streams them with dataset=prepared.

Everything here is offline: generated image folders (with an unreadable file, a grayscale, a CMYK and a
too-small image), a tiny AutoencoderKL and a tiny CLIPTextModel built from configs and saved with
save_pretrained, loaded back through the same code paths as the real SD VAE and CLIP.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tld import prepare as P
from tld import train as T

REPO = Path(__file__).resolve().parent.parent
SYNSETS = ("n01440764", "n01443537")


# --------------------------------------------------------------------------- generated data and encoders

def make_class_folder(root: Path, per_class: int = 5) -> Path:
    """ImageNet's layout: two synset folders of random RGB images of several shapes, plus a grayscale, a CMYK,
    a too-small (10x7) and an unreadable image."""
    rng = np.random.default_rng(0)
    for c, syn in enumerate(SYNSETS):
        (root / syn).mkdir(parents=True)
        for k in range(per_class):
            h, w = 20 + 4 * c, 20 + 6 * k
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / syn / f"img{k}.png")
    Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8), mode="L").save(root / SYNSETS[0] / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), mode="CMYK").save(root / SYNSETS[1] / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)).save(root / SYNSETS[0] / "small.png")
    (root / SYNSETS[1] / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / ".hidden").mkdir()  # not a class
    return root


def make_caption_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    rows = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (18 + 2 * k, 24, 3), dtype=np.uint8)).save(root / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "caption": f"a photo number {k}"})
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / "small.png")
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    rows += [{"file_name": "gray.png", "caption": "a gray one"}, {"file_name": "small.png", "caption": "a small one"},
             {"file_name": "broken.png", "caption": "a broken one"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_vae_folder(folder: Path) -> Path:
    """A tiny diffusers AutoencoderKL (4 latent channels, 4x downsampling), saved with save_pretrained."""
    from diffusers import AutoencoderKL

    from tld.autoencoder import tiny_vae_config

    torch.manual_seed(0)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(folder)
    return folder


def make_clip_folder(folder: Path) -> Path:
    """A tiny transformers CLIPTextModel and a CLIP tokenizer (byte alphabet + letter-pair merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [f"{a} {b}" for a in letters for b in letters]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    CLIPTextModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"classes": make_class_folder(root / "classes"), "captions": make_caption_folder(root / "captions"),
            "vae": make_vae_folder(root / "vae"), "clip": make_clip_folder(root / "clip")}


def run_prepare(source, out, *args):
    return P.prepare(P.config_from_args([f"source={source}", f"out={out}", "progress=false", *args]))


def arrays(folder: Path) -> dict:
    """Every shard array, concatenated in shard order, plus the manifest without where it was made."""
    m = json.loads((folder / "manifest.json").read_text())
    out = {}
    for s in m["shards"]:
        for f in sorted((folder / "shards" / s["name"]).glob("*.npy")):
            out.setdefault(f.stem, []).append(np.load(f))
    return {k: np.concatenate(v) for k, v in out.items()}, m


# --------------------------------------------------------------------------- preprocessing

def test_adm_center_crop_box_halves_then_resizes_the_shorter_side_and_crops_the_centre():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))   # 100 wide, 40 high
    half = im.resize((50, 20), Image.Resampling.BOX)                          # 40 >= 2 * 16: halve once
    scaled = np.asarray(half.resize((40, 16), Image.Resampling.BICUBIC))       # shorter side 20 -> 16
    np.testing.assert_array_equal(P.adm_center_crop(im, 16), scaled[:, 12:28])
    small = Image.fromarray(rng.integers(0, 256, (7, 10, 3), dtype=np.uint8))  # smaller than size: upscaled
    assert P.adm_center_crop(small, 16).shape == (16, 16, 3)


# --------------------------------------------------------------------------- a class-subfolder folder

def test_class_folder_gives_sorted_synset_labels_rgb_images_and_skips_the_unreadable_one(data, tmp_path, capfd):
    out = run_prepare(data["classes"], tmp_path / "p", "size=16", "dtype=float32", "shard_size=4")
    err = capfd.readouterr().err
    a, m = arrays(out)
    broken = str(data["classes"] / SYNSETS[1] / "broken.jpg")
    assert broken in err                                             # reported with its path
    assert m["skipped"] == 1 and m["skipped_examples"][0]["where"] == broken
    assert m["count"] == m["items"] == 5 + 5 + 3 and m["upscaled"] == 1      # the 10x7 image, upscaled
    assert m["class_names"] == list(SYNSETS) and m["num_classes"] == 2 and m["labels"]
    assert json.loads((out / "classes.json").read_text()) == {SYNSETS[0]: 0, SYNSETS[1]: 1}
    assert m["latent_shape"] == [3, 16, 16] and m["dtype"] == "float32" and m["codec"] is None
    assert len(m["shards"]) == 4 and a["latents"].shape == (13, 3, 16, 16)
    # each row is ADM's crop of its file, in [-1, 1], with the right label
    src = P.open_source(P.PrepareConfig(source=str(data["classes"])))
    for row, i in enumerate(a["items"]):
        want = P.adm_center_crop(src.open(i), 16).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(a["latents"][row], want, atol=1e-6)
        assert a["labels"][row] == SYNSETS.index(src.files[i].split("/")[0])
    gray = a["latents"][list(a["items"]).index(src.files.index(f"{SYNSETS[0]}/gray.png"))]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])   # grayscale -> RGB
    assert "cmyk.jpg" in " ".join(src.files[i] for i in a["items"])                # CMYK -> RGB, kept


def test_bad_images_can_be_an_error_and_small_ones_skipped(data, tmp_path):
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        run_prepare(data["classes"], tmp_path / "a", "size=16", "bad=error")
    m = json.loads((run_prepare(data["classes"], tmp_path / "b", "size=16", "small=skip") / "manifest.json").read_text())
    assert m["skipped"] == 2 and m["upscaled"] == 0 and m["count"] == 12
    assert any("smaller than size=16" in s["error"] for s in m["skipped_examples"])


def test_flip_encodes_each_image_and_its_mirror(data, tmp_path):
    a, m = arrays(run_prepare(data["classes"], tmp_path / "p", "size=16", "flip=true", "dtype=float32"))
    assert m["views"] == 2 and m["count"] == 2 * m["items"] == 26
    np.testing.assert_array_equal(a["latents"][1::2], a["latents"][0::2][..., ::-1])
    np.testing.assert_array_equal(a["labels"][1::2], a["labels"][0::2])


# --------------------------------------------------------------------------- captions, a VAE and CLIP

def test_captioned_folder_through_a_saved_autoencoderkl_and_clip_text_model(data, tmp_path):
    from tld.autoencoder import DiffusersVAE
    from tld.text import CLIPText

    out = run_prepare(data["captions"], tmp_path / "p", "size=16", f"codec={data['vae']}", "scale=0.5",
                      f"text_encoder={data['clip']}", "projection=false", "text=both", "batch_size=3")
    a, m = arrays(out)
    assert m["count"] == 8 and m["skipped"] == 1 and m["upscaled"] == 1 and not m["labels"]
    assert m["latent_shape"] == [4, 4, 4] and m["dtype"] == "float16" and m["text"] == ["pooled", "tokens"]
    assert m["codec"]["scale"] == 0.5 and len(m["codec"]["weights"]) == 64 and len(m["digests"]["codec"]) == 20
    assert m["text_encoder"]["class"] == "CLIPText" and m["digests"]["text_encoder"]
    captions = json.loads((out / "shards/00000/captions.json").read_text())
    assert captions[:2] == ["a photo number 0", "a photo number 1"] and "a broken one" not in captions
    src = P.open_source(P.PrepareConfig(source=str(data["captions"])))
    x = torch.stack([torch.from_numpy(P.adm_center_crop(src.open(i), 16).transpose(2, 0, 1).copy())
                     for i in a["items"]]).float() / 127.5 - 1
    with torch.no_grad():
        z = DiffusersVAE(str(data["vae"]), scale=0.5).encode(x)
    torch.testing.assert_close(torch.from_numpy(a["latents"]).float(), z, atol=2e-3, rtol=2e-3)
    pooled, tokens, mask = CLIPText(str(data["clip"]), projection=False).encode(captions)
    torch.testing.assert_close(torch.from_numpy(a["pooled"]).float(), pooled, atol=2e-3, rtol=2e-3)
    assert a["tokens"].shape == (8, 77, 32) and np.array_equal(a["mask"], mask.numpy())
    with pytest.raises(ValueError, match="needs captions"):
        run_prepare(data["classes"], tmp_path / "q", f"text_encoder={data['clip']}", "projection=false")


def test_a_datasets_dataset_is_a_source_saved_to_disk_or_as_an_imagefolder(data, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the optional `prepare` extra
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "imagefolder"
    for k, name in enumerate(("cat", "dog", "cat", "dog", "dog")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(data["classes"] / SYNSETS[0] / f"img{k}.png", folder / name / f"{k}.png")
    datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").save_to_disk(str(tmp_path / "hf"))
    a, m = arrays(run_prepare(tmp_path / "hf", tmp_path / "p", "size=16", "dtype=float32"))
    assert m["source"]["kind"] == "datasets" and m["class_names"] == ["cat", "dog"] and m["count"] == 5
    src = P.open_source(P.PrepareConfig(source=str(tmp_path / "hf")))
    for row in range(5):
        want = P.adm_center_crop(src.open(row), 16).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(a["latents"][row], want, atol=1e-6)
    assert sorted(a["labels"].tolist()) == [0, 0, 1, 1, 1]
    b, _ = arrays(run_prepare(f"imagefolder:{folder}", tmp_path / "q", "size=16", "dtype=float32"))
    np.testing.assert_array_equal(np.sort(b["latents"].reshape(5, -1), 0), np.sort(a["latents"].reshape(5, -1), 0))


# --------------------------------------------------------------------------- resume

def test_an_interrupted_prepare_resumes_at_its_first_unfinished_shard_and_equals_an_uninterrupted_one(
        data, tmp_path, monkeypatch):
    args = ("size=16", f"codec={data['vae']}", "scale=0.5", "shard_size=3", "batch_size=2")
    whole = arrays(run_prepare(data["classes"], tmp_path / "whole", *args))
    real, calls = P._write_shard, []

    def killed_in_the_third(folder, *a, **k):
        calls.append(folder.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, mid-run
        return real(folder, *a, **k)

    monkeypatch.setattr(P, "_write_shard", killed_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(data["classes"], tmp_path / "cut", *args)
    assert not (tmp_path / "cut/manifest.json").exists() and (tmp_path / "cut/prepare.json").is_file()
    with pytest.raises(FileNotFoundError, match="did not finish; rerun the same"):
        P.PreparedDataset(tmp_path / "cut")
    stamp = (tmp_path / "cut/shards/00000/latents.npy").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(P, "_write_shard", lambda folder, *a, **k: calls.append(folder.name) or real(folder, *a, **k))
    resumed = arrays(run_prepare(data["classes"], tmp_path / "cut", *args))
    assert calls == ["00002", "00003", "00004"]                     # the finished shards are kept
    assert (tmp_path / "cut/shards/00000/latents.npy").stat().st_mtime_ns == stamp
    assert resumed[1] == whole[1]
    for k in whole[0]:
        np.testing.assert_array_equal(resumed[0][k], whole[0][k])
    with pytest.raises(ValueError, match="already holds another prepared dataset"):
        run_prepare(data["classes"], tmp_path / "cut", *args[:-1], "size=8")


# --------------------------------------------------------------------------- the trainer streams it

def smoke(tmp_path, *args):
    return T.config_from_args(["preset=smoke", f"out_dir={tmp_path / 'run'}", "progress=false", "max_steps=2",
                               "batch_size=4", "sample_steps=2", *args])


def test_the_trainer_streams_a_prepared_folder_with_classes_from_the_manifest(data, tmp_path):
    out = run_prepare(data["classes"], tmp_path / "p", "size=16", "shard_size=4")
    ds = T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={out}"))
    assert len(ds) == 13 and ds.num_classes == 2 and ds[5]["image"].dtype == torch.float32
    # streamed: an item is its row of the shard's file, read alone (nothing is loaded whole)
    np.testing.assert_array_equal(ds[5]["image"].numpy(), np.load(out / "shards/00001/latents.npy")[1])
    assert ds[5]["label"] == np.load(out / "shards/00001/labels.npy")[1]
    assert all(not hasattr(v, "__array__") for v in vars(ds).values() if not isinstance(v, (list, np.ndarray)))
    summary = T.train(smoke(tmp_path, "dataset=prepared", f"data_root={out}"))
    assert summary["steps"] == 2
    kw = json.loads((tmp_path / "run/config.json").read_text())["model_kwargs"]
    assert kw["num_classes"] == 2 and kw["img_size"] == 16 and kw["in_chans"] == 3


def test_a_text_run_trains_on_prepared_pooled_embeddings_without_its_encoders(data, tmp_path):
    out = run_prepare(data["captions"], tmp_path / "t", "size=16", f"text_encoder={data['clip']}", "projection=false")
    summary = T.train(smoke(tmp_path, "dataset=prepared", f"data_root={out}", "conditioning=text", "model=tld-course",
                            "model.embed_dim=32", "model.depth=1", "model.head_dim=16", "model.noise_embed_dim=16"))
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "run/config.json").read_text())["model_kwargs"]["text_dim"] == 32
    assert not (tmp_path / "run/text_encoder").exists()           # the folder's embeddings, no encoder trained


def t2i(tmp_path, folder, *args):
    """The uvit-t2i recipe (77 CLIP tokens as U-ViT's context) at toy size on a prepared folder."""
    return T.config_from_args(["preset=uvit-t2i", f"data_root={folder}", f"out_dir={tmp_path / 'run'}", "image_size=16",
                               "batch_size=4", "max_steps=2", "warmup_steps=0", "mixed_precision=no", "model.embed_dim=32",
                               "model.depth=2", "model.num_heads=2", "sample_steps=2", "progress=false", *args])


def test_uvit_t2i_trains_on_a_prepared_folders_clip_token_sequence(data, tmp_path):
    out = run_prepare(data["captions"], tmp_path / "t", "size=16", f"text_encoder={data['clip']}", "projection=false",
                      "text=tokens")
    cfg = t2i(tmp_path, out)
    assert cfg.dataset == "prepared" and cfg.text_tokens
    ds = T.build_dataset(cfg)
    assert ds[0]["text"].shape == (77, 32) and ds[0]["mask"].dtype == torch.bool
    assert T.train(cfg)["steps"] == 2
    kw = json.loads((tmp_path / "run/config.json").read_text())["model_kwargs"]
    assert (kw["text_len"], kw["text_dim"], kw["in_chans"]) == (77, 32, 3)   # the 77 tokens, CLIP's width
    # the manifest names the CLIP that encoded the captions: the run ends with a token pipeline, as on shapes
    from tld.pipeline import TextToImage

    pipe = TextToImage.from_pretrained(tmp_path / "run/pipeline")
    assert pipe.config["condition"] == "tokens"
    cond, _ = pipe.condition(["a photo number 0"])
    torch.testing.assert_close(cond[0], ds[0]["text"], atol=2e-3, rtol=2e-3)   # the same encoder as prepare's
    assert pipe(["a photo number 3"], steps=2).shape == (1, 3, 16, 16)
    # the FID protocol prompts it with the folder's own captions (image i: caption i mod C), as from a file
    from tld.evaluate import sample_to_npz

    captions = P.prepared_captions(out)
    assert captions[:2] == ["a photo number 0", "a photo number 1"] and len(captions) == 8
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    kw = dict(steps=2, guidance=2.0, sampler="ddim", batch_size=5)
    by_folder = sample_to_npz(tmp_path / "run", 10, tmp_path / "a.npz", captions=str(out), **kw)
    by_file = sample_to_npz(tmp_path / "run", 10, tmp_path / "b.npz", captions=str(tmp_path / "captions.txt"), **kw)
    shapes = sample_to_npz(tmp_path / "run", 10, tmp_path / "c.npz", **kw)       # the held-out shapes captions
    with np.load(by_folder) as a, np.load(by_file) as b, np.load(shapes) as c:
        assert a["arr_0"].shape == (10, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert not np.array_equal(a["arr_0"], c["arr_0"])
    pooled = run_prepare(data["captions"], tmp_path / "p", "size=16", f"text_encoder={data['clip']}", "projection=false")
    with pytest.raises(ValueError, match="text_tokens=true needs 'tokens'.*has \\['pooled'\\].*use text_tokens=false"
                                         ".*text=both"):
        T.build_dataset(t2i(tmp_path, pooled))


def test_a_text_run_says_why_it_saved_no_pipeline_when_its_encoder_is_gone(data, tmp_path):
    clip = shutil.copytree(data["clip"], tmp_path / "clip")
    out = run_prepare(data["captions"], tmp_path / "t", "size=16", f"text_encoder={clip}", "projection=false",
                      f"codec={data['vae']}", "scale=0.5")
    shutil.rmtree(clip)
    summary = T.train(smoke(tmp_path, "dataset=prepared", f"data_root={out}", "conditioning=text", "image_size=4",
                            "model.patch_size=1"))
    assert summary["pipeline"].startswith("no pipeline saved: the prepared folder's text encoder")
    assert "cannot be loaded here" in summary["pipeline"] and not (tmp_path / "run/pipeline").exists()
    assert json.loads((tmp_path / "run/summary.json").read_text())["pipeline"] == summary["pipeline"]
    assert (tmp_path / "run/samples/step_0000002.png").is_file()     # decoded by the codec, which is still here


def test_a_run_of_the_wrong_kind_names_what_the_folder_holds(data, tmp_path):
    text = run_prepare(data["captions"], tmp_path / "t", "size=16", f"text_encoder={data['clip']}", "projection=false")
    classes = run_prepare(data["classes"], tmp_path / "c", "size=16")
    with pytest.raises(ValueError, match="conditioning=class needs labels.*conditioning=text"):
        T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={text}"))
    with pytest.raises(ValueError, match="image_size=32, but .* holds 3x16x16 pixels.*set image_size=16"):
        T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={classes}", "image_size=32"))
    with pytest.raises(ValueError, match="conditioning=text needs 'pooled'.*conditioning=class"):
        T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={classes}", "conditioning=text"))
    ds = T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={text}", "conditioning=text"))
    assert ds[0]["text"].shape == (32,)
    with pytest.raises(FileNotFoundError, match="does not exist.*python -m tld.prepare"):
        T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={tmp_path / 'nowhere'}"))
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; dataset=prepared reads a folder.*dataset=tensors"):
        T.build_dataset(smoke(tmp_path, "dataset=prepared", f"data_root={tmp_path / 'x.safetensors'}"))


def test_a_folder_without_labels_under_class_conditioning_is_an_error_that_names_the_fix(data, tmp_path):
    with pytest.raises(ValueError, match="conditioning=class .* needs an integer 'label'.*conditioning=none"):
        T.build_dataset(smoke(tmp_path, "dataset=folder", f"data_root={data['captions']}", "image_size=16"))
    labelled = tmp_path / "labelled"
    shutil.copytree(data["captions"], labelled)
    rows = [json.loads(x) for x in (labelled / "captions.jsonl").read_text().splitlines()]
    (labelled / "captions.jsonl").write_text("".join(json.dumps({**r, "label": k % 3}) + "\n" for k, r in enumerate(rows)))
    assert T.build_dataset(smoke(tmp_path, "dataset=folder", f"data_root={labelled}", "image_size=16")).num_classes == 3


# --------------------------------------------------------------------------- a prepared folder as the FID reference

def test_a_prepared_folder_is_a_fid_reference_pixels_as_stored_latents_decoded_by_its_codec(data, tmp_path):
    from tld.autoencoder import DiffusersVAE
    from tld.evaluate import score_npz

    pixels = run_prepare(data["classes"], tmp_path / "px", "size=16")          # float16 pixels: exact as uint8
    batches, count, _ = P.iter_prepared_images(pixels, batch=5)
    got = np.concatenate(list(batches()))
    a, m = arrays(pixels)
    src = P.open_source(P.PrepareConfig(source=str(data["classes"])))
    want = np.stack([P.adm_center_crop(src.open(i), 16) for i in a["items"]])
    assert count == 13 and got.dtype == np.uint8 and np.array_equal(got, want)
    # FID / KID against the folder = against an .npz of the same images
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=want)
    by_folder = score_npz(tmp_path / "samples.npz", pixels, "classifier", kid_subsets=5)
    by_npz = score_npz(tmp_path / "samples.npz", tmp_path / "ref.npz", "classifier", kid_subsets=5)
    assert by_folder["fid"] == pytest.approx(by_npz["fid"], rel=1e-6) and by_folder["kid"] == pytest.approx(by_npz["kid"])
    assert by_folder["n_reference"] == 13 and "a prepared folder: 13 images, 16 px, pixels" in by_folder["reference"]
    assert score_npz(tmp_path / "samples.npz", pixels, "classifier", kid_subsets=5, ref_n=4)["n_reference"] == 4
    np.savez(tmp_path / "s8.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="prepared folder of 16 px images, the samples are 8 px"):
        score_npz(tmp_path / "s8.npz", pixels, "classifier")
    # latents: decoded by the manifest's codec, one view per item of a flip=true folder
    vae = shutil.copytree(data["vae"], tmp_path / "vae")
    latents = run_prepare(data["classes"], tmp_path / "z", "size=16", f"codec={vae}", "scale=0.5", "flip=true")
    batches, count, what = P.iter_prepared_images(latents, batch=4)
    got = np.concatenate(list(batches()))
    z = torch.from_numpy(arrays(latents)[0]["latents"][0::2]).float()
    with torch.no_grad():
        x = DiffusersVAE(str(vae), scale=0.5).decode(z)
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert count == 13 and np.abs(got.astype(int) - want.astype(int)).max() <= 1 and "decoded" in what
    shutil.rmtree(vae)                                                  # the codec moved: say so, by name
    with pytest.raises(FileNotFoundError, match="codec .*vae.* cannot be loaded here"):
        score_npz(tmp_path / "samples.npz", latents, "classifier")


def test_the_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    assert P.main(["source=/nowhere", f"out={tmp_path}"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert P.main(["nonsense"]) == 2 and P.main(["colour=red"]) == 2
    assert P.main(["--help"]) == 0 and "ADM's rule" in capsys.readouterr().out


def test_bench_prepare_prints_both_comparisons(capsys):
    from tld.bench import bench_prepare

    res = bench_prepare(["--n", "32", "--size", "32", "--steps", "2", "--batch-size", "8", "--model", "uvit-tiny"])
    text = capsys.readouterr().out
    assert "encoder forward alone" in text and "model step" in text
    assert res["prepare_images_per_s"] > 0 and res["encoder_images_per_s"] > 0
    assert res["data_s_per_step"] > 0 and res["model_s_per_step"] > 0


# --------------------------------------------------------------------------- two processes

def launch(module: str, *args) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    """Issue 15's offline end to end, in 2 processes at each stage: prepare a class folder through the tiny VAE,
    train a few steps on it, sample N images into ADM's .npz with tld.evaluate (decoded by the codec the folder's
    manifest names), and score FID and KID (classifier features) against the prepared folder itself.

    Returns {'one', 'two': the 1- and 2-process prepared folders, 'run', 'run1': the 2- and 1-process training
    runs, 'samples': the .npz}."""
    root = tmp_path_factory.mktemp("mp")
    args = ["size=16", f"codec={data['vae']}", "scale=0.5", "shard_size=3", "batch_size=2", "progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tld.prepare", f"source={data['classes']}", f"out={root / 'one'}",
                          *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch("tld.prepare", f"source={data['classes']}", f"out={root / 'two'}", *args)
    train = ["preset=smoke", "dataset=prepared", f"data_root={root / 'two'}", "image_size=4", "model.patch_size=1",
             "batch_size=4", "max_steps=3", "sample_steps=2", "log_every=1", "progress=false"]
    launch("tld.train", *train, f"out_dir={root / 'run'}")
    T.train(T.config_from_args([*train, f"out_dir={root / 'run1'}"]))   # the same run in one process
    launch("tld.evaluate", f"checkpoint={root / 'run'}", "n=8", "steps=2", "batch_size=4", "sampler=ddim",
           f"out={root / 'samples.npz'}", f"ref={root / 'two'}", "features=classifier", "progress=false")
    return {"one": root / "one", "two": root / "two", "run": root / "run", "run1": root / "run1",
            "samples": root / "samples.npz"}


@pytest.mark.multiprocess
def test_two_processes_prepare_what_one_does(two_process_run):
    (a1, m1), (a2, m2) = arrays(two_process_run["one"]), arrays(two_process_run["two"])
    assert m1 == m2 and m2["count"] == 13
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])


@pytest.mark.multiprocess
def test_two_processes_train_on_the_prepared_folder(two_process_run):
    run = two_process_run["run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    kw = json.loads((run / "config.json").read_text())["model_kwargs"]
    assert kw["num_classes"] == 2 and kw["in_chans"] == 4 and kw["img_size"] == 4
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # each rank read its slice of every global batch: together, the batch one process reads (same weights)
    ckpt = "checkpoints/step_0000003/model.safetensors"
    one, two = load_file(str(two_process_run["run1"] / ckpt)), load_file(str(run / ckpt))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)


@pytest.mark.multiprocess
def test_two_processes_sample_into_adm_npz_and_score_fid_and_kid_against_the_prepared_folder(two_process_run):
    samples = two_process_run["samples"]
    made = json.loads(samples.with_name("samples.npz.json").read_text())
    assert made["processes"] == 2 and made["kind"] == "class"
    with np.load(samples) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (8, 16, 16, 3)   # latents decoded to 16 px
        assert z["arr_1"].tolist() == [i % 2 for i in range(8)]
    score = json.loads(samples.with_name("samples.npz.score.json").read_text())
    assert score["features"] == "classifier:shapes-classifier" and score["n_samples"] == 8
    assert score["n_reference"] == 13 and "a prepared folder: 13 images" in score["reference"]
    assert np.isfinite(score["fid"]) and score["fid"] > 0 and score["kid"] is not None
