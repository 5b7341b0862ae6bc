"""Claims of the FID-50K protocol (python -m tld.evaluate ... out=samples.npz ref=...), offline on shapes
with the shapes-classifier features: ADM's .npz format, per-image seeds (so 1 and 2 processes write the
same file), a resumable run, and FID / KID against an .npz of images, precomputed statistics or a folder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tld import assets
from tld.data import ShapesDataset
from tld.evaluate import iter_npz, main, npz_keys, sample_to_npz, score_npz, write_npz
from tld.fid import feature_statistics, image_features

SHAPES_COND = assets.path("shapes-cond-uvit")
ARGS = dict(steps=2, guidance=3.0, sampler="dpm++2m", seed=0, batch_size=4)


def real_npz(path, n, size=32, seed=777):
    x = ShapesDataset(size=size, seed=seed, length=n).batch(range(n))["image"]
    arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, arr_0=arr)
    return arr


def test_write_npz_streams_chunks_that_np_load_reads_back(tmp_path):
    a = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    write_npz(tmp_path / "x.npz", {"arr_0": (a.shape, np.uint8, [a[:2], a[2:]]), "arr_1": ((5,), np.int64, [np.arange(5)])})
    with np.load(tmp_path / "x.npz") as z:
        assert np.array_equal(z["arr_0"], a) and np.array_equal(z["arr_1"], np.arange(5))
    assert np.array_equal(np.concatenate(list(iter_npz(tmp_path / "x.npz", batch=2))), a)
    assert npz_keys(tmp_path / "x.npz") == {"arr_0": (5, 2, 3), "arr_1": (5,)}
    with pytest.raises(ValueError, match="wrote 2 rows"):
        write_npz(tmp_path / "y.npz", {"arr_0": (a.shape, np.uint8, [a[:2]])})
    assert not (tmp_path / "y.npz").exists()


def test_samples_are_adm_format_and_independent_of_the_batch_split(tmp_path):
    out = sample_to_npz(SHAPES_COND, 10, tmp_path / "s.npz", **ARGS)
    with np.load(out) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    assert labels.tolist() == [i % 18 for i in range(10)]
    assert not (tmp_path / "s.npz.parts").exists()
    # image i's noise is seeded by (seed, i): an ODE sampler gives it whatever batch it falls in
    other = sample_to_npz(SHAPES_COND, 10, tmp_path / "t.npz", **{**ARGS, "batch_size": 3})
    with np.load(other) as z:
        assert np.abs(z["arr_0"].astype(int) - images.astype(int)).max() <= 1   # float rounding of batch sizes


def test_a_killed_sampling_run_resumes_at_its_missing_batches(tmp_path):
    ref = sample_to_npz(SHAPES_COND, 8, tmp_path / "ref.npz", **ARGS)
    parts = tmp_path / "s.npz.parts"
    sample_to_npz(SHAPES_COND, 8, tmp_path / "s.npz", **ARGS)
    # simulate a kill after batch 0: its files stay, the rest and the .npz are gone
    (tmp_path / "s.npz").unlink()
    (tmp_path / "s.npz.json").unlink()
    parts.mkdir()
    with np.load(ref) as z:
        np.save(parts / "images_000000.npy", np.zeros_like(z["arr_0"][:4]))   # a marker: must be kept, not redone
        np.save(parts / "labels_000000.npy", z["arr_1"][:4])
    (parts / "settings.json").write_text(json.dumps({"checkpoint": str(SHAPES_COND), "n": 8, **ARGS, "codec": ""}))
    sample_to_npz(SHAPES_COND, 8, tmp_path / "s.npz", **ARGS)
    with np.load(tmp_path / "s.npz") as z, np.load(ref) as r:
        assert (z["arr_0"][:4] == 0).all() and np.array_equal(z["arr_0"][4:], r["arr_0"][4:])
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"n": 9}))
    (tmp_path / "s.npz.json").unlink()
    with pytest.raises(ValueError, match="other settings"):
        sample_to_npz(SHAPES_COND, 8, tmp_path / "s.npz", **ARGS)


def test_scores_against_images_statistics_and_a_folder_agree(tmp_path):
    from PIL import Image

    samples = sample_to_npz(SHAPES_COND, 16, tmp_path / "s.npz", **ARGS)
    arr = real_npz(tmp_path / "real.npz", 24)
    by_images = score_npz(samples, tmp_path / "real.npz", "classifier", kid_subsets=10)
    assert by_images["features"] == "classifier:shapes-classifier"
    assert by_images["n_samples"] == 16 and by_images["n_reference"] == 24 and by_images["fid"] > 0
    assert by_images["kid"] is not None and by_images["kid_stderr"] > 0 and by_images["kid_subset_size"] == 16
    # the same images as a folder of PNGs give the same scores
    folder = tmp_path / "real"
    folder.mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    by_folder = score_npz(samples, folder, "classifier", kid_subsets=10)
    assert by_folder["fid"] == pytest.approx(by_images["fid"], rel=1e-6)
    assert by_folder["kid"] == pytest.approx(by_images["kid"], rel=1e-6)
    # real against real scores far lower than samples against real
    real_npz(tmp_path / "real2.npz", 16, seed=778)
    floor = score_npz(tmp_path / "real2.npz", tmp_path / "real.npz", "classifier", kid_subsets=10)
    assert floor["fid"] < by_images["fid"]
    # ADM-style precomputed statistics alone: FID from them (classifier features need the images)
    f = image_features(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, "classifier")
    mu, sigma = feature_statistics(f)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="only mu/sigma"):
        score_npz(samples, tmp_path / "stats.npz", "classifier")


def test_cli_writes_samples_and_scores_naming_the_features(tmp_path, capsys):
    real_npz(tmp_path / "real.npz", 16)
    out = tmp_path / "s.npz"
    rc = main([f"checkpoint={SHAPES_COND}", "n=8", "steps=2", "batch_size=4", f"out={out}",
               f"ref={tmp_path / 'real.npz'}", "features=classifier", "progress=false"])
    assert rc == 0
    score = json.loads((tmp_path / "s.npz.score.json").read_text())
    assert score["features"] == "classifier:shapes-classifier" and score["n"] == 8
    printed = capsys.readouterr().out
    assert "FID-8 (classifier:shapes-classifier)" in printed and "KID (classifier:shapes-classifier)" in printed


def test_cli_inception_without_the_package_names_it(tmp_path, capsys):
    from tld.fid import inception_available

    if inception_available():
        pytest.skip("Inception is installed here")
    real_npz(tmp_path / "real.npz", 4)
    rc = main([f"checkpoint={SHAPES_COND}", "n=4", "steps=1", "batch_size=4", f"out={tmp_path / 's.npz'}",
               f"ref={tmp_path / 'real.npz'}", "progress=false"])   # features default to inception here
    assert rc == 2 and "torch-fidelity" in capsys.readouterr().err
    assert main([f"checkpoint={SHAPES_COND}", "n=4", f"ref={tmp_path / 'real.npz'}"]) == 2   # ref needs out=*.npz


@pytest.mark.multiprocess
def test_two_processes_write_the_same_npz_as_one(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    args = [f"checkpoint={SHAPES_COND}", "n=10", "steps=2", "batch_size=3", "sampler=ddpm", "progress=false"]
    assert main(args + [f"out={tmp_path / 'one.npz'}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tld.evaluate", *args,
           f"out={tmp_path / 'two.npz'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "two.npz.json").read_text())["processes"] == 2
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_a_text_pipeline_samples_the_held_out_captions_into_the_same_format(tmp_path):
    from tld.autoencoder import IdentityCodec
    from tld.models import create
    from tld.pipeline import TextToImage
    from tld.text import train_tiny_clip

    clip = train_tiny_clip(steps=2, batch_size=8, dim=16, width=16, depth=1, image_width=8, image_size=16)
    spec = dict(img_size=16, in_chans=3, num_classes=0, text_dim=16, embed_dim=32, depth=1, head_dim=16,
                noise_embed_dim=16)
    torch.manual_seed(0)
    pipe = TextToImage(create("tld-course", **spec), clip, IdentityCodec(3), denoiser_config={"name": "tld-course", **spec},
                       schedule="rectified", prediction="x0", null="zero")
    folder = pipe.save_pretrained(tmp_path / "pipe")
    out = sample_to_npz(folder, 5, tmp_path / "t.npz", **ARGS)
    keys = npz_keys(out)
    assert keys == {"arr_0": (5, 16, 16, 3)}   # no labels for text
    assert json.loads((tmp_path / "t.npz.json").read_text())["kind"] == "text"
