"""Claims of two trainer options: log_with= (accelerate's trackers, beside log.jsonl) and text_tokens=true
(U-ViT on the text encoder's whole token sequence, the uvit-t2i recipe), both offline."""

import importlib.util
import json

import pytest
import torch

from tld.config import PRESETS, config_from_args
from tld.train import train

HAVE_TENSORBOARD = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="neither tensorboard nor tensorboardX is installed "
                                                  "(pip install 'tld-course[eval]' brings tensorboard)")
def test_log_with_tensorboard_writes_event_files_beside_log_jsonl(tmp_path):
    out = tmp_path / "run"
    train(config_from_args(["preset=smoke", f"out_dir={out}", "max_steps=4", "log_every=2", "progress=false",
                            "log_with=tensorboard"]))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), list(out.rglob("*"))
    assert len((out / "log.jsonl").read_text().splitlines()) == 2   # log.jsonl stays


def test_log_with_names_the_known_trackers():
    with pytest.raises(ValueError, match="'tensorbored'.*tensorboard.*wandb"):
        config_from_args(["preset=smoke", "log_with=tensorbored"])
    assert config_from_args(["preset=smoke", "log_with=tensorboard,wandb"]).log_with == "tensorboard,wandb"


def test_text_tokens_needs_a_uvit_and_text_conditioning():
    with pytest.raises(ValueError, match="text_tokens.*U-ViT"):
        config_from_args(["preset=shapes-t2i", "text_tokens=true"])   # the TLD denoiser takes pooled text
    with pytest.raises(ValueError, match="text_tokens.*conditioning=text"):
        config_from_args(["preset=smoke", "text_tokens=true"])


def test_uvit_t2i_follows_the_ms_coco_u_vit_s_deep_recipe():
    p = PRESETS["uvit-t2i"]
    assert (p["model"], p["model_overrides"]["depth"], p["conditioning"], p["text_tokens"]) == \
        ("uvit-s/2", 16, "text", True)
    assert (p["lr"], p["weight_decay"], (p["beta1"], p["beta2"]), p["warmup_steps"], p["batch_size"]) == \
        (2e-4, 0.03, (0.9, 0.9), 5000, 256)
    assert (p["class_dropout"], p["prediction"], p["ema_decay"]) == (0.1, "eps", 0.9999)


def test_uvit_t2i_trains_on_a_tiny_clips_77_tokens_and_saves_a_token_pipeline(tmp_path):
    from test_text import make_clip_text_folder

    from tld.pipeline import TextToImage
    from tld.text import CLIPText

    clip = make_clip_text_folder(tmp_path / "clip")             # a tiny CLIPTextModelWithProjection, 77 positions
    pointer = CLIPText(str(clip)).save_pretrained(tmp_path / "text_encoder")
    out = tmp_path / "run"
    train(config_from_args([
        "preset=uvit-t2i", "dataset=shapes", "image_size=16", f"text_encoder={pointer}", "cache_items=32",
        "batch_size=8", "max_steps=2", "warmup_steps=0", "mixed_precision=no", "model.embed_dim=32",
        "model.depth=2", "model.num_heads=2", "sample_steps=2", "log_every=1", f"out_dir={out}",
        "progress=false"]))
    kw = json.loads((out / "config.json").read_text())["model_kwargs"]
    assert (kw["text_len"], kw["text_dim"], kw["in_chans"]) == (77, 32, 3)   # CLIP's tokens, its hidden width
    pipe = TextToImage.from_pretrained(out / "pipeline")
    assert pipe.config["condition"] == "tokens"
    cond, null = pipe.condition(["a red circle", "a blue square"])
    assert cond.shape == (2, 77, 32) and torch.equal(null, torch.zeros_like(cond))
    images = pipe(["a red circle", "a blue square"], steps=2, guidance=2.0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_uvit_t2i_reads_a_tensors_files_token_sequence(tmp_path):
    """A small .safetensors with 'text' [N, 77, D] (CLIP's tokens) beside the latents also feeds the recipe
    (its own data path, a prepared folder, is tests/test_prepare.py's)."""
    from safetensors.torch import save_file

    from tld.runs import load_model

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "toy.safetensors"
    save_file({"images": torch.randn(16, 4, 8, 8, generator=g), "text": torch.randn(16, 77, 8, generator=g)}, str(path))
    train(config_from_args(["preset=uvit-t2i", "dataset=tensors", f"data_root={path}", "image_size=8", "batch_size=8", "max_steps=2",
                            "warmup_steps=0", "mixed_precision=no", "model.embed_dim=32", "model.depth=2",
                            "model.num_heads=2", "sample_steps=2", f"out_dir={tmp_path / 'run'}", "progress=false"]))
    model = load_model(tmp_path / "run")
    assert (model.text_len, model.text_dim, model.in_chans) == (77, 8, 4)
