"""Run folders: where a training run keeps its checkpoints, encoders and logs, and how to load them.

    runs/NAME/
      config.json              the run's TrainConfig and model arguments
      log.jsonl, summary.json  the loss curve, the end-of-run figures
      checkpoints/
        latest.json            {"step": S, "path": "step_000000S"}, written after the folder is complete
        step_000000S/          config.json + model.safetensors + ema.safetensors + optimizer.safetensors
      text_encoder/, codec/    encoders a run trained itself (``encoder_folder``; ``codec_folder``)
      pipeline/                the TextToImage a text run ends with

Every folder is written through ``tld.io`` (built beside the old one, then swapped in), so an
interrupted save never leaves a checkpoint that loads half old and half new.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from . import assets, io
from .models import create

__all__ = ["TRAINED_ENCODERS", "encoder_folder", "checkpoint_folder", "save_checkpoint", "latest_checkpoint",
           "load_checkpoint_state", "load_model"]

# the encoders a text run can train itself, by the spec that asks for them
TRAINED_ENCODERS = {"text_encoder": "tinyclip", "codec": "tiny-vae"}


def encoder_folder(spec: str, out_dir, name: str) -> Path | None:
    """Where a run's text encoder or codec lives: trained by the run (spec "tinyclip" / "tiny-vae") in
    out_dir/<name>, or the saved folder the spec names (a path, or inside a shipped model: ``shapes-t2i/codec``);
    None for no codec (pixels)."""
    if not spec:
        return None
    return Path(out_dir) / name if spec == TRAINED_ENCODERS[name] else assets.resolve(spec)


def codec_folder(path) -> Path | None:
    """The codec that decodes a latent model's samples, or None for a pixel model: an exported model's own
    ``codec/`` (``tld.demo export`` copies it there), a run's ``codec/`` (codec=tiny-vae), or the saved folder
    the run's ``codec=`` named. ``path`` is a run, a checkpoint or an exported folder."""
    path = Path(path)
    if (path / "codec").is_dir():
        return path / "codec"
    ckpt = latest_checkpoint(path) if (path / "checkpoints").exists() else path
    config = (ckpt or path) / "config.json"
    tc = io.read_json(config).get("train_config", {}) if config.is_file() else {}
    if not tc.get("codec"):
        return None
    run_dir = ckpt.parent.parent if ckpt is not None and ckpt.parent.name == "checkpoints" else path
    folder = encoder_folder(tc["codec"], run_dir, "codec")
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(path)!r} makes latents for codec={tc['codec']!r}, but {str(folder)!r} is not "
                                f"here; pass the codec folder that made them")
    return folder


def checkpoint_folder(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, ema: nn.Module, optimizer, meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_XXXXXXX/ atomically, point latest.json at it, keep the newest ``keep``.

    Args:
        out_dir: the run folder.
        step: the number of optimiser steps taken.
        model, ema: the raw and the averaged weights.
        optimizer: its state goes to optimizer.safetensors (+ its settings in config.json), not a pickle.
        meta: what else config.json records (the training config, the model preset and arguments).
        keep: how many checkpoints to keep, this one included.
    """
    final = checkpoint_folder(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = io.optimizer_state_to_tensors(optimizer.state_dict())
    io.save_state(final, {"step": step, **meta, "optimizer": opt_meta}, model=model.state_dict(),
                  ema=ema.state_dict(), optimizer=opt_tensors)
    point_latest(out_dir, step)
    old = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        try:
            shutil.rmtree(p)
        except OSError as e:  # a full disk or a permission problem: say so, keep training
            warnings.warn(f"could not delete the old checkpoint {p}: {e}", stacklevel=2)
    return final


def point_latest(out_dir, step: int) -> None:
    """Point ``out_dir``'s checkpoints/latest.json (what a resume starts from) at its step ``step`` checkpoint."""
    folder = checkpoint_folder(out_dir, step)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint of step {step} in {Path(out_dir) / 'checkpoints'}")
    io.write_json(folder.parent / "latest.json", {"step": step, "path": folder.name})


def latest_checkpoint(out_dir) -> Path | None:
    """The folder latest.json points at, or None when the run has no complete checkpoint yet."""
    pointer = Path(out_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    path = io.recover(pointer.parent / io.read_json(pointer)["path"])
    return path if path.exists() else None


def load_checkpoint_state(ckpt: Path, model: nn.Module, ema: nn.Module, optimizer) -> dict:
    """Load a checkpoint's weights and optimizer state into the given objects; returns its config.json."""
    meta, states = io.load_state(ckpt, "model", "ema")
    model.load_state_dict(states["model"])
    ema.load_state_dict(states["ema"])
    if (ckpt / "optimizer.safetensors").is_file():
        state = io.optimizer_state_from_tensors(io.load_state(ckpt, "optimizer")[1]["optimizer"], meta["optimizer"])
    else:  # a checkpoint written before the redesign: a tensors-only pickle, read without unpickling code
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    optimizer.load_state_dict(state)
    return meta


def model_weights(path, which: str = "ema", device="cpu") -> tuple[dict, dict, Path]:
    """(config.json, state dict, its file) of a checkpoint folder, a run folder (its latest checkpoint) or an
    exported model folder (only ``model.safetensors``, read for either ``which``)."""
    path = Path(path)
    if (path / "checkpoints").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}")
        path = found
    path = io.recover(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a tld checkpoint: {path / 'config.json'} is missing")
    name = which if (path / f"{which}.safetensors").exists() else "model"
    meta, states = io.load_state(path, name, device=str(device))
    return meta, states[name], path / f"{name}.safetensors"


def load_model(path, which: str = "ema", device="cpu") -> nn.Module:
    """Load a trained model from a checkpoint folder (or a run folder, taking its latest checkpoint).

    ``which`` is ``ema`` (what samples should come from) or ``model`` (the raw weights); an exported
    folder holds only ``model.safetensors``, which is then read for either.
    """
    meta, state, file = model_weights(path, which, device)
    model = create(meta["model"], **meta["model_kwargs"])
    io.load_exact(model, state, file, f"model {meta['model']!r}")
    model.train_config = meta.get("train_config", {})
    model.model_kwargs = meta["model_kwargs"]
    return model.to(device).eval()
