"""make demo's code path, on a tiny model: train, sample every class, judge, write the picture."""

import json

from PIL import Image

from tld import demo
from tld import train as T


def test_demo_trains_judges_and_writes_a_labelled_grid(tmp_path, capsys):
    out_png = tmp_path / "samples.png"
    rc = demo.main([f"out={out_png}", f"out_dir={tmp_path / 'run'}", "model=uvit-tiny", "image_size=16",
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
    rc = demo.main([f"out={tmp_path / 's.png'}", f"out_dir={tmp_path / 'run'}", "model=uvit-tiny",
                    "image_size=16", "max_steps=2", "max_minutes=0", "per_class=1", "steps=2",
                    "progress=false", f"reference={ref}"])
    assert rc == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:4] in ("this", "refe")]
    assert rows == ["this", "reference"]


def test_demo_rejects_bare_words(capsys):
    assert demo.main(["fast"]) == 2
    assert "expected key=value" in capsys.readouterr().err
