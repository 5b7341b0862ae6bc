"""tld: transformer latent diffusion, step by step.

The course's notebooks import this package; the same code trains full runs with
``python -m tld.train`` or ``accelerate launch -m tld.train``. Importing ``tld`` is
cheap and never touches CUDA (so ``accelerate.notebook_launcher`` can fork after it).
"""

__version__ = "0.1.0"

import importlib

# The layers: a module imports only modules of its own layer or below, at its top, never in a
# circle (tests/test_layers.py checks it). Lower layers know nothing of the ones above them.
LAYERS = {
    # 0: foundations, each standing alone (io: atomic folder saves; assets: the shipped models; cli: key=value)
    "io": 0, "assets": 0, "cli": 0, "diffusion": 0, "patch": 0, "blocks": 0, "data": 0, "viz": 0,
    # 1: denoisers (one preset table), samplers (with the one `generate`), optimisation
    "models": 1, "samplers": 1, "optim": 1, "gmm": 1,
    # 2: encoders, caches, run folders, the judges (shapes classifier and adherence; the geometric reader), FID
    "text": 2, "autoencoder": 2, "cache": 2, "runs": 2, "judge": 2, "geometry": 2, "fid": 2,
    # 3: the text-to-image pipeline; the training config and presets; real data -> shards
    "pipeline": 3, "config": 3, "prepare": 3,
    # 3: a run's data side (the dataset a config names, text runs' encoders and cache, the batch order)
    "training_data": 3,
    # 4: the training loop; 5: evaluating a checkpoint, comparing training recipes; 6: tools on top
    "train": 4, "evaluate": 5, "quality": 5, "demo": 6, "bench": 6, "interop": 6, "course": 6,
}
_SUBMODULES = tuple(LAYERS)


def __getattr__(name):
    # Submodules load on first use: `import tld; tld.diffusion.get_schedule(...)` works
    # without importing accelerate, matplotlib or transformers up front.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tld' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
