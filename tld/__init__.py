"""tld: transformer latent diffusion, step by step.

The course's notebooks import this package; the same code trains full runs with
``python -m tld.train`` or ``accelerate launch -m tld.train``. Importing ``tld`` is
cheap and never touches CUDA (so ``accelerate.notebook_launcher`` can fork after it).
"""

__version__ = "0.1.0"

import importlib

_SUBMODULES = (
    "data", "diffusion", "patch", "blocks", "models", "samplers", "train",
    "evaluate", "viz", "bench", "course", "text", "autoencoder", "pipeline", "interop", "demo",
)


def __getattr__(name):
    # Submodules load on first use: `import tld; tld.diffusion.get_schedule(...)` works
    # without importing accelerate, matplotlib or transformers up front.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tld' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
