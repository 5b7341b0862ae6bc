"""Claims of lesson 00: the datasets are deterministic, fast, captioned, and fail clearly."""

import itertools
import json

import numpy as np
import pytest
import torch

from tld.data import (
    COLORS,
    DEFAULT_COLORS,
    POSITIONS,
    SHAPES,
    CaptionedImageFolder,
    DigitsDataset,
    ShapesDataset,
    make_caption,
    make_loader,
    measure_render_rate,
    parse_caption,
)

# --------------------------------------------------------------------------- shapes

def test_same_seed_and_index_give_bit_identical_images_in_any_order():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    forward = [a[i]["image"] for i in range(20)]
    backward = [b[i]["image"] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)
    assert a[7]["caption"] == b[7]["caption"]


def test_different_seeds_give_different_images():
    a, b = ShapesDataset(seed=0).grid(16), ShapesDataset(seed=1).grid(16)
    assert not torch.equal(a, b)
    # ... and different indices differ too (not one image repeated).
    assert len({tuple(x.flatten().tolist()) for x in a}) == 16


def test_batch_equals_stacked_items_bit_for_bit():
    ds = ShapesDataset(size=24, seed=5)
    idx = [9, 2, 40, 2, 17, 33, 0, 11]
    b = ds.batch(idx)
    assert torch.equal(b["image"], torch.stack([ds[i]["image"] for i in idx]))
    assert b["caption"] == [ds[i]["caption"] for i in idx]
    assert b["label"].tolist() == [ds[i]["label"] for i in idx]


def test_items_are_float32_in_range_with_all_keys():
    ds = ShapesDataset(size=32)
    x = ds.grid(64)
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    item = ds[0]
    assert set(item) >= {"image", "caption", "label", "shape", "color", "position"}
    assert isinstance(item["caption"], str) and isinstance(item["label"], int)


def test_label_is_shape_index_times_colors_plus_color_index():
    ds = ShapesDataset()
    assert ds.num_classes == 18 and len(ds.class_names) == 18
    for i in range(200):
        it = ds[i]
        assert it["label"] == it["shape"] * len(DEFAULT_COLORS) + it["color"]
        names = parse_caption(it["caption"])
        assert ds.class_names[it["label"]] == f"{names['color']} {names['shape']}"
        assert it["caption"] in ds.captions_for_label(it["label"])


def test_every_class_and_position_appears():
    b = ShapesDataset(seed=0).batch(range(2000))
    assert set(b["label"].tolist()) == set(range(18))
    assert set(b["position"].tolist()) == set(range(9))


@pytest.mark.parametrize("shape,color,position", list(itertools.product(SHAPES, COLORS, POSITIONS)))
def test_caption_round_trips_through_parse_caption(shape, color, position):
    caption = make_caption(shape, color, position)
    assert parse_caption(caption) == {"shape": shape, "color": color, "position": position}


def test_parse_caption_forgives_case_spacing_and_period():
    assert parse_caption("  A Red  Circle in the CENTER. ") == {"shape": "circle", "color": "red", "position": "center"}


@pytest.mark.parametrize("bad,word", [
    ("a purple circle at the top", "purple"),
    ("a red hexagon at the top", "hexagon"),
    ("a red circle at the middle", "at the middle"),
    ("red circle", "red circle"),
    ("", "''"),
])
def test_parse_caption_names_what_it_could_not_read(bad, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(bad)


def _shape_box(image, bg_value):
    """Rows/cols that differ from the background (the shape's bounding box)."""
    mask = (image - bg_value).abs().sum(0) > 1e-6
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


@pytest.mark.parametrize("size", [8, 13, 16, 32, 64])
def test_any_size_keeps_shapes_inside_their_cell_and_off_the_border(size):
    ds = ShapesDataset(size=size, seed=2)
    bg = ds[0]["image"][:, :1, :1]    # every corner pixel is background
    for i in range(60):
        it = ds[i]
        assert it["image"].shape == (3, size, size)
        top, bottom, left, right = _shape_box(it["image"], bg)
        # Shape's centre of mass lies in the named third of the image.
        cy, cx = (top + bottom + 1) / 2 / size, (left + right + 1) / 2 / size
        px, py = POSITIONS[ds.positions[it["position"]]]
        assert abs(cx - px) < 1 / 6 and abs(cy - py) < 1 / 6, (i, it["caption"], cx, cy)
        # Not cut off: at least one background pixel all around.
        assert top > 0 and left > 0 and bottom < size - 1 and right < size - 1, (i, it["caption"])


@pytest.mark.parametrize("size,msg", [(5, "size 5 is too small"), (0, "size 0"), (16.0, "must be an int"),
                                      ("32", "must be an int")])
def test_bad_size_raises_naming_the_value(size, msg):
    with pytest.raises(ValueError, match=msg):
        ShapesDataset(size=size)


def test_unknown_color_raises():
    with pytest.raises(ValueError, match="teal"):
        ShapesDataset(colors=("red", "teal"))


def test_render_rate_measures_what_it_renders():
    # the speed itself is a benchmark (python -m tld.bench data), not a timed unit test
    rate = measure_render_rate(size=32, n=50)
    assert 0 < rate < float("inf")


def test_data_benchmark_reports_render_time_against_a_training_step(capsys):
    from tld.bench import main
    main(["data", "--batch", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "images/s" in out and "rendering / training step" in out


# --------------------------------------------------------------------------- digits

def test_digits_shapes_labels_and_split():
    train, test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert len(train) + len(test) == 1797 and len(test) == 1797 // 5
    it = train[0]
    assert it["image"].shape == (1, 8, 8) and it["image"].dtype == torch.float32
    assert it["image"].min() >= -1 and it["image"].max() <= 1
    assert it["caption"] == f"the digit {it['label']}" and 0 <= it["label"] <= 9
    assert set(train.labels.tolist()) == set(range(10))
    big = DigitsDataset(size=16, channels=3, split="test")
    assert big[0]["image"].shape == (3, 16, 16) and big[0]["label"] == test[0]["label"]


def test_digits_bad_split_and_size():
    with pytest.raises(ValueError, match="'val'"):
        DigitsDataset(split="val")
    with pytest.raises(ValueError, match="size 4 is too small"):
        DigitsDataset(size=4)


# --------------------------------------------------------------------------- image folders

def _write_images(root, n=3, size=(40, 30)):
    from PIL import Image

    names = []
    for k in range(n):
        arr = np.full((size[1], size[0], 3), 60 * k, np.uint8)
        name = f"img{k}.png"
        Image.fromarray(arr).save(root / name)
        names.append(name)
    return names


def test_image_folder_from_jsonl(tmp_path):
    names = _write_images(tmp_path)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for k, n in enumerate(names):
            f.write(json.dumps({"file_name": n, "text": f"picture {k}", "label": k}) + "\n")
    ds = CaptionedImageFolder(tmp_path, size=16)
    assert len(ds) == 3
    it = ds[2]
    assert it["image"].shape == (3, 16, 16) and it["caption"] == "picture 2" and it["label"] == 2
    assert torch.allclose(it["image"], torch.full_like(it["image"], 120 / 127.5 - 1), atol=1e-5)


def test_image_folder_from_csv_without_labels(tmp_path):
    names = _write_images(tmp_path)
    (tmp_path / "captions.csv").write_text("file,caption\n" + "".join(f"{n},a grey square {n}\n" for n in names))
    ds = CaptionedImageFolder(tmp_path, size=24)
    assert [ds[k]["caption"] for k in range(3)] == [f"a grey square {n}" for n in names]
    assert ds[0]["label"] == -1 and ds[0]["image"].shape == (3, 24, 24)
    batch = next(iter(make_loader(ds, batch_size=2, shuffle=False)))
    assert batch["image"].shape == (2, 3, 24, 24) and len(batch["caption"]) == 2


def test_image_folder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        CaptionedImageFolder(tmp_path / "nope")


def test_image_folder_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionedImageFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        CaptionedImageFolder(tmp_path)


def test_image_folder_csv_without_caption_column(tmp_path):
    names = _write_images(tmp_path)
    (tmp_path / "captions.csv").write_text("file_name,description\n" + "".join(f"{n},x\n" for n in names))
    with pytest.raises(ValueError, match=r"description.*caption, text, prompt"):
        CaptionedImageFolder(tmp_path)


def test_image_folder_lists_a_missing_file(tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "ghost.png", "caption": "boo"}) + "\n")
    with pytest.raises(FileNotFoundError, match="ghost.png"):
        CaptionedImageFolder(tmp_path)


def test_image_folder_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "broken.png", "caption": "x"}) + "\n")
    ds = CaptionedImageFolder(tmp_path)
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]


def test_image_folder_bad_size(tmp_path):
    with pytest.raises(ValueError, match="size 3 is too small"):
        CaptionedImageFolder(tmp_path, size=3)


# --------------------------------------------------------------------------- loaders

def test_loader_is_deterministic_by_seed_with_and_without_workers():
    ds = ShapesDataset(size=16, length=64)

    def first_batches(seed, workers=0):
        loader = make_loader(ds, batch_size=8, seed=seed, num_workers=workers)
        return [b["label"].tolist() for b in itertools.islice(loader, 3)], next(iter(loader))["image"]

    (labels_a, img_a), (labels_b, img_b) = first_batches(0), first_batches(0)
    assert labels_a == labels_b and torch.equal(img_a, img_b)
    assert first_batches(1)[0] != labels_a
    labels_w, img_w = first_batches(0, workers=2)
    assert labels_w == labels_a and torch.equal(img_w, img_a)
