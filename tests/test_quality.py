"""tld.quality: the recipe sweep of `python -m tld.bench quality` and its two readers."""

import pytest
import torch

from tld import quality
from tld.data import ShapesDataset
from tld.geometry import distorted_batch
from tld.runs import checkpoint_folder, load_model


def test_read_samples_reads_renders_right_and_tells_distortions_apart():
    ds = ShapesDataset(size=32, seed=3, length=36)
    batch = ds.batch(range(36))
    real = quality.read_samples(batch["image"], batch["label"])
    assert real["color"] == 1.0 and real["shape"] == 1.0 and real["geo_shape"] == 1.0 and real["strict"] >= 0.95
    # notched squares keep their color and pass as squares for the lenient classifier, never for the strict reading
    notched, _ = distorted_batch("notched square", n=36, size=32, seed=3)
    labels = torch.tensor([ds.params(i)[1] for i in range(36)]) + len(ds.colors) * 1   # square = shape 1
    bad = quality.read_samples(notched, labels)
    assert bad["color"] == 1.0 and bad["strict"] == 0.0 and bad["iou"] < real["iou"] - 0.03, bad


@pytest.mark.slow
def test_a_sweep_trains_each_arm_with_its_keys_and_scores_every_checkpoint(tmp_path, capsys):
    rows = quality.sweep(["x0", "v"], steps=4, evals=2, root=tmp_path, per_class=1)
    assert [(r["arm"], r["step"]) for r in rows] == [("x0", 2), ("x0", 4), ("v", 2), ("v", 4)]
    for r in rows:
        for k in ("color", "shape", "both", "geo_shape", "strict", "iou"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert r["minutes"] > 0 and r["steps_per_s"] > 0
    # each arm is cpu-demo with its own keys changed, and nothing else
    x0, v = (load_model(checkpoint_folder(tmp_path / a, 4)).train_config for a in ("x0", "v"))
    assert (x0["prediction"], v["prediction"]) == ("x0", "v")
    assert {k for k in x0 if x0[k] != v[k] and k != "out_dir"} == {"prediction"}
    printed = capsys.readouterr().out
    assert printed.count("geometry: shape") == 2   # each arm's table as soon as it is done


def test_a_sweep_from_another_base_preset_changes_only_the_arm_s_keys(tmp_path):
    quality.sweep(["x0", "x0+all-positions"], steps=2, evals=1, root=tmp_path, per_class=1, base="cpu-lesson")
    centered, nine = (load_model(checkpoint_folder(tmp_path / a, 2)).train_config for a in ("x0", "x0+all-positions"))
    assert centered["model"] == "uvit-course" and centered["image_size"] == 16 and centered["shapes_positions"] == "center"
    assert {k for k in centered if centered[k] != nine[k] and k != "out_dir"} == {"shapes_positions"}
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        quality.sweep(["x0"], steps=2, evals=1, root=tmp_path, base="nope")


def test_bad_arms_and_options_are_named():
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['x1'\]"):
        quality.sweep(["x1"], steps=2)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['step'\]"):
        quality.main(["step=3"])
