"""The shipped models, and the one way any module or lesson finds them.

    from tld import assets
    assets.path("shapes-t2i")        # the folder; FileNotFoundError saying how to get it when absent

They are package data: a clone and an installed wheel (pip, Colab) both carry them, found from any
working directory, offline. Each folder holds a README with the exact command that made it and its
measured quality. There is no fallback to a weaker model: a missing one is an error.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHIPPED", "ROOT", "path", "available", "resolve"]

# name: what it is (and the command that rebuilds it)
SHIPPED = {
    "shapes-cond": "the class-conditional model on 32 px shapes: latent diffusion, the TLD denoiser on shapes-t2i's "
                   "VAE latents, with that codec in codec/ (python -m tld.train preset=shapes-cond, then python -m "
                   "tld.demo export --fp16)",
    "shapes-cond-uvit": "make demo's reference, the class-conditional U-ViT on 32 px shapes (python -m tld.train "
                        "preset=cpu-demo, then python -m tld.demo export --fp16)",
    "shapes-t2i": "the text-to-image pipeline on shapes (python -m tld.train preset=shapes-t2i)",
    "shapes-udit": "lesson 11's U-DiT on centered 16 px shapes (python -m tld.train preset=cpu-lesson "
                   "loss_weighting=none model=udit-course model.learn_sigma=false, then python -m tld.demo export)",
    "shapes-classifier": "the shapes classifier that judges samples (python -m tld.evaluate train-classifier)",
}

ROOT = Path(__file__).resolve().parent


def available(name: str) -> bool:
    """True when the shipped model ``name`` is on disk."""
    _check(name)
    return (ROOT / name).is_dir()


def path(name: str) -> Path:
    """The folder of the shipped model ``name``; a FileNotFoundError says how to get it when it is absent."""
    _check(name)
    folder = ROOT / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the shipped model {name!r} ({SHIPPED[name]}) is missing: expected it at {folder}. It is package "
            f"data of tld-course; reinstall the package (pip install --force-reinstall 'tld-course @ "
            f"git+https://github.com/tld-course/tld'), or rebuild it with the command above")
    return folder


def resolve(path_or_name) -> Path:
    """A folder given on a command line: an existing path as it is, else the shipped model of that name, or a
    folder inside one (``shapes-t2i/codec``: the same from a clone and from an installed wheel)."""
    p = Path(path_or_name)
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] not in SHIPPED:
        return p
    return path(p.parts[0]).joinpath(*p.parts[1:])


def _check(name: str) -> None:
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
