"""A save that fails part-way loses nothing: for a pipeline, a training checkpoint and a text encoder,
an exception after the first file, or SIGKILL in the middle, leaves the previous folder loading exactly
as before (the same outputs), and the next save goes through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tld import io
from tld.autoencoder import DiffusersVAE, tiny_vae_config
from tld.models import create
from tld.pipeline import TextToImage
from tld.runs import latest_checkpoint, load_model, save_checkpoint
from tld.text import TinyCLIP, shapes_captions, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top left", "a blue square in the center"]


class Interrupted(RuntimeError):
    pass


def fail_after_first_file(monkeypatch):
    """Every file a save writes goes through io.save_tensors or io.write_json (or a tokenizer/diffusers
    writer between them): let the first through, then raise, as a full disk or Ctrl-C would."""
    writes = []
    for name in ("save_tensors", "write_json"):
        real = getattr(io, name)

        def wrapped(*args, _real=real, **kw):
            if writes:
                raise Interrupted("interrupted after the first file")
            writes.append(args[0])
            return _real(*args, **kw)

        monkeypatch.setattr(io, name, wrapped)
    return writes


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def perturbed(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


# --------------------------------------------------------------------------- the three kinds of folder

@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return TinyCLIP(train_bpe_tokenizer(shapes_captions(n=300)), dim=16, width=16, depth=1, image_width=8).eval()


def make_pipeline(clip):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = dict(name="tld-course", num_classes=0, text_dim=16, in_chans=4, img_size=8, patch_size=2, embed_dim=32,
               depth=1, head_dim=16, noise_embed_dim=16)
    spec = dict(cfg)
    codec = DiffusersVAE(AutoencoderKL(**tiny_vae_config()), scale=0.7)
    return TextToImage(create(spec.pop("name"), **spec), clip, codec, denoiser_config=cfg, sampler="ddim")


def pipeline_output(folder) -> torch.Tensor:
    return TextToImage.from_pretrained(folder)(PROMPTS, steps=3, seed=1)


def encoder_output(folder) -> torch.Tensor:
    return TinyCLIP.from_pretrained(folder).encode(PROMPTS)[0]


def checkpoint_output(folder) -> torch.Tensor:
    model = load_model(folder)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return model(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 2]))


def save_run_checkpoint(run: Path, model) -> Path:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meta = {"train_config": {}, "model": "uvit-tiny", "model_kwargs": {}}
    return save_checkpoint(run, 5, model, model, opt, meta)


def test_pipeline_save_interrupted_after_its_first_file_keeps_the_previous_pipeline(clip, tmp_path, monkeypatch):
    folder = tmp_path / "t2i"
    old = make_pipeline(clip)
    old.save_pretrained(folder)
    before = pipeline_output(folder)
    new = make_pipeline(clip)
    perturbed(new.denoiser)
    assert (new(PROMPTS, steps=3, seed=1) - before).abs().max() > 1e-3   # the new one would draw otherwise
    writes = fail_after_first_file(monkeypatch)
    with pytest.raises(Interrupted):
        new.save_pretrained(folder)
    assert writes and Path(writes[0]).name == "denoiser.safetensors"   # the new denoiser was written...
    monkeypatch.undo()
    torch.testing.assert_close(pipeline_output(folder), before, rtol=0, atol=0)   # ...but never seen
    assert hidden_leftovers(folder) == []
    new.save_pretrained(folder)   # and the next save goes through whole
    torch.testing.assert_close(pipeline_output(folder), new(PROMPTS, steps=3, seed=1), rtol=0, atol=0)


def test_encoder_save_interrupted_after_its_first_file_keeps_the_previous_encoder(clip, tmp_path, monkeypatch):
    folder = tmp_path / "text_encoder"
    clip.save_pretrained(folder)
    before = encoder_output(folder)
    new = perturbed(TinyCLIP.from_pretrained(folder))
    fail_after_first_file(monkeypatch)
    with pytest.raises(Interrupted):
        new.save_pretrained(folder)
    monkeypatch.undo()
    torch.testing.assert_close(encoder_output(folder), before, rtol=0, atol=0)
    assert hidden_leftovers(folder) == []


def test_checkpoint_save_interrupted_after_its_first_file_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = save_run_checkpoint(tmp_path / "run", create("uvit-tiny"))
    before = checkpoint_output(ckpt)
    fail_after_first_file(monkeypatch)
    with pytest.raises(Interrupted):
        save_run_checkpoint(tmp_path / "run", perturbed(create("uvit-tiny")))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == ckpt
    torch.testing.assert_close(checkpoint_output(tmp_path / "run"), before, rtol=0, atol=0)
    assert hidden_leftovers(ckpt) == []


# --------------------------------------------------------------------------- killed with SIGKILL

KILLER = """
import os, signal, sys, torch
from tld import io
real = io.save_tensors
def save_then_die(*args, **kw):
    real(*args, **kw)                      # one new file is on disk...
    os.kill(os.getpid(), signal.SIGKILL)   # ...and the process dies, no cleanup of any kind
io.save_tensors = save_then_die
folder, kind = sys.argv[1], sys.argv[2]
with torch.no_grad():
    if kind == "pipeline":
        from tld.pipeline import TextToImage
        obj = TextToImage.from_pretrained(folder)
        for p in obj.denoiser.parameters(): p.add_(0.1)
        for p in obj.text_encoder.parameters(): p.add_(0.1)
        obj.save_pretrained(folder)
    elif kind == "encoder":
        from tld.text import TinyCLIP
        obj = TinyCLIP.from_pretrained(folder)
        for p in obj.parameters(): p.add_(0.1)
        obj.save_pretrained(folder)
    else:
        from pathlib import Path
        from tld.runs import load_model, save_checkpoint
        model = load_model(folder)
        for p in model.parameters(): p.add_(0.1)
        run = Path(folder).parents[1]
        save_checkpoint(run, 5, model, model, torch.optim.AdamW(model.parameters()),
                        {"train_config": {}, "model": "uvit-tiny", "model_kwargs": {}})
"""


def kill_mid_save(folder: Path, kind: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(folder), kind], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["pipeline", "encoder", "checkpoint"])
def test_a_save_killed_with_sigkill_leaves_the_previous_folder_loading_as_before(kind, clip, tmp_path):
    torch.manual_seed(0)
    if kind == "pipeline":
        folder, output = tmp_path / "t2i", pipeline_output
        make_pipeline(clip).save_pretrained(folder)
    elif kind == "encoder":
        folder, output = tmp_path / "text_encoder", encoder_output
        clip.save_pretrained(folder)
    else:
        folder, output = save_run_checkpoint(tmp_path / "run", create("uvit-tiny")), checkpoint_output
    before = output(folder)
    kill_mid_save(folder, kind)
    assert [n for n in hidden_leftovers(folder) if ".partial-" in n]   # the killed save left its partial...
    torch.testing.assert_close(output(folder), before, rtol=0, atol=0)   # ...and it is never read
    if kind == "encoder":   # the next save clears the dead writer's partial and goes through
        TinyCLIP.from_pretrained(folder).save_pretrained(folder)
        assert hidden_leftovers(folder) == []
