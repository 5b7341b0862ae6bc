"""The shipped models, and the one way any module or lesson finds them.

    from tld import assets
    assets.path("shapes-t2i")        # the folder; FileNotFoundError saying how to get it when absent

Each shipped folder holds a README with the exact command that made it and its measured quality.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHIPPED", "ROOT", "path", "available"]

# name: what it is (and the command that rebuilds it)
SHIPPED = {
    "shapes-cond": "the class-conditional U-ViT on shapes (python -m tld.train preset=cpu-demo, then "
                   "python -m tld.demo export)",
    "shapes-t2i": "the text-to-image pipeline on shapes (python -m tld.train preset=shapes-t2i)",
    "shapes-classifier": "the shapes classifier that judges samples (python -m tld.evaluate train-classifier)",
}

ROOT = Path(__file__).resolve().parent.parent / "data" / "pretrained"


def available(name: str) -> bool:
    """True when the shipped model ``name`` is on disk."""
    _check(name)
    return (ROOT / name).is_dir()


def path(name: str) -> Path:
    """The folder of the shipped model ``name``; a FileNotFoundError says how to get it when it is absent."""
    _check(name)
    folder = ROOT / name
    if not folder.is_dir():
        raise FileNotFoundError(f"the shipped model {name!r} ({SHIPPED[name]}) is not at {folder}; it comes with "
                                f"a clone of the course repository (data/pretrained/{name})")
    return folder


def _check(name: str) -> None:
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
