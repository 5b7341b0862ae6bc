"""make demo's code path, on a tiny model: train, sample every class, judge, write the picture."""

import json

import pytest
from PIL import Image

from tld import assets, demo
from tld import train as T


def test_demo_trains_judges_and_writes_a_labelled_grid(tmp_path, capsys):
    out_png = tmp_path / "samples.png"
    rc = demo.main([f"out={out_png}", f"out_dir={tmp_path / 'run'}", "preset=cpu-demo", "model=uvit-tiny", "image_size=16",
                    "max_steps=4", "max_minutes=0", "per_class=1", "steps=2", "progress=false",
                    f"reference={tmp_path / 'no-reference'}"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "color acc" in text and "this run" in text and "steps/s" in text and "geometry: shape" in text
    assert "no reference checkpoint" in text
    image = Image.open(out_png)
    assert image.height > 18 * 16, "one row per class (18)"


def test_export_then_compare_with_a_reference(tmp_path, capsys):
    run = tmp_path / "ref-run"
    T.train(T.config_from_args(["preset=smoke", f"out_dir={run}", "progress=false", "max_steps=3"]))
    ref = demo.export(run, tmp_path / "reference")
    assert sorted(p.name for p in ref.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((ref / "config.json").read_text())["step"] == 3
    rc = demo.main([f"out={tmp_path / 's.png'}", f"out_dir={tmp_path / 'run'}", "preset=cpu-demo", "model=uvit-tiny",
                    "image_size=16", "max_steps=2", "max_minutes=0", "per_class=1", "steps=2",
                    "progress=false", f"reference={ref}"])
    assert rc == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:4] in ("this", "refe")]
    assert rows == ["this", "reference"]


def test_a_missing_shipped_reference_is_an_error_before_any_training(tmp_path, monkeypatch):
    # without reference=, the demo compares with the shipped model; gone, it says which and how to get it back,
    # instead of quietly showing the run alone after ten minutes of training
    monkeypatch.setattr(assets, "ROOT", tmp_path / "no-assets")
    monkeypatch.setattr(T, "train", lambda cfg: pytest.fail("trained before finding the reference"))
    args = [a for a in _tiny_demo_args(tmp_path) if not a.startswith("reference=")]
    with pytest.raises(FileNotFoundError, match="shapes-cond-uvit.*reinstall"):
        demo.main(args)


def test_make_demo_trains_latent_diffusion_on_the_shipped_codec_beside_shapes_cond(tmp_path, capsys, monkeypatch):
    """The default preset: the images encoded once by shapes-t2i's codec, a latent TLD denoiser trained on them,
    its samples decoded, and the shipped shapes-cond (the same recipe, longer) beside it."""
    assert demo.PRESET == "cpu-demo-latent" and demo.REFERENCES[demo.PRESET] == "shapes-cond"
    cfg = T.config_from_args([f"preset={demo.PRESET}"])
    assert (cfg.codec, cfg.model, cfg.max_minutes) == ("shapes-t2i/codec", "tld-course", 10)
    seen = {}
    real = demo.class_samples

    def spy(model, *a, codec=None, **k):
        seen.setdefault("codecs", []).append(codec)
        return real(model, *a, codec=codec, **k)

    monkeypatch.setattr(demo, "class_samples", spy)
    rc = demo.main([f"out={tmp_path / 's.png'}", f"out_dir={tmp_path / 'run'}", "cache_items=64", "max_steps=2",
                    "max_minutes=0", "per_class=1", "steps=2", "progress=false", "model.depth=1"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = [line.split()[0] for line in text.splitlines() if line[:4] in ("this", "refe")]
    assert rows == ["this", "reference"] and "2 DPM-Solver++(2M) steps" in text   # the sampler it used, named
    assert all(c is not None for c in seen["codecs"]) and len(seen["codecs"]) == 2   # both panels decoded
    assert Image.open(tmp_path / "s.png").height > 18 * 32


def test_demo_rejects_bare_words(capsys):
    assert demo.main(["fast"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def _tiny_demo_args(tmp_path):
    return [f"out={tmp_path / 's.png'}", f"out_dir={tmp_path / 'run'}", "preset=cpu-demo", "model=uvit-tiny", "image_size=16",
            "max_steps=2", "max_minutes=0", "per_class=1", "steps=2", "progress=false",
            f"reference={tmp_path / 'no-reference'}"]


def test_demo_guides_only_at_high_noise_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    seen = []
    generate = T.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("guidance_interval"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(demo.T, "generate", spy)
    assert demo.main(_tiny_demo_args(tmp_path)) == 0
    assert seen[-1] == demo.GUIDANCE_INTERVAL == (0.3, 1.0)   # (the trainer's own sample grid comes first)
    assert "guidance 3.0 for t in [0.3, 1.0]" in capsys.readouterr().out
    assert demo.main(_tiny_demo_args(tmp_path) + ["guidance_interval=none", "resume=true"]) == 0
    assert seen[-1] is None
    assert "at every step" in capsys.readouterr().out


def test_demo_names_a_bad_guidance_interval(tmp_path, capsys):
    assert demo.main(_tiny_demo_args(tmp_path) + ["guidance_interval=0.5"]) == 2
    assert "guidance_interval='0.5': expected two times lo,hi" in capsys.readouterr().err
    assert demo.main(_tiny_demo_args(tmp_path) + ["guidance_interval=0.8,0.2"]) == 2
    assert "expected 0 <= lo < hi <= 1" in capsys.readouterr().err


def test_export_in_fp16_halves_the_file_and_loads_as_float32(tmp_path):
    import torch

    from tld.runs import load_model

    run = tmp_path / "ref-run"
    T.train(T.config_from_args(["preset=smoke", f"out_dir={run}", "progress=false", "max_steps=3"]))
    full, half = demo.export(run, tmp_path / "full"), None
    assert demo.main(["export", str(run), str(tmp_path / "half"), "--fp16"]) == 0
    half = tmp_path / "half"
    size = {p.name: (p / "model.safetensors").stat().st_size for p in (full, half)}
    assert 0.45 < size["half"] / size["full"] < 0.55, size
    a, b = load_model(full), load_model(half)
    assert json.loads((half / "config.json").read_text())["stored_dtype"] == "float16"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert pb.dtype == pa.dtype == torch.float32, name
        torch.testing.assert_close(pb, pa.half().float(), rtol=0, atol=0)   # exactly the fp16 rounding


def test_an_exported_folder_re_exports_in_place_to_fp16_keeping_its_readme(tmp_path):
    import torch

    from tld.runs import load_model

    run = tmp_path / "run"
    T.train(T.config_from_args(["preset=smoke", f"out_dir={run}", "progress=false", "max_steps=3"]))
    shipped = demo.export(run, tmp_path / "shipped")
    (shipped / "README.md").write_text("how it was made\n")
    before = load_model(shipped).state_dict()
    assert demo.main(["export", str(shipped), str(shipped), "--fp16"]) == 0   # the folder onto itself
    assert (shipped / "README.md").read_text() == "how it was made\n"
    assert json.loads((shipped / "config.json").read_text())["stored_dtype"] == "float16"
    after = load_model(shipped).state_dict()
    assert after.keys() == before.keys()
    for name, p in before.items():
        torch.testing.assert_close(after[name], p.half().float(), rtol=0, atol=0, msg=name)
