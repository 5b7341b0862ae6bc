"""One save/load convention for everything tld writes, all-or-nothing.

Every saved thing (a training checkpoint, exported EMA weights, a text encoder, a codec, a
classifier, a whole pipeline with sub-folders) is a *folder* of ``config.json`` plus
``*.safetensors`` files. A folder is written beside its old self, in a hidden sibling
``.{name}.partial-{pid}-{random}``, and swapped into place only once every file is on disk. A
save that raises, is interrupted or is killed part-way leaves the previous folder exactly as it
was:

    with atomic_folder("runs/x/pipeline") as tmp:
        write_json(tmp / "config.json", config)
        save_state(tmp / "codec", codec_config, model=codec.state_dict())   # nested: fine

    save_state("runs/x/ckpt", {"step": 100}, model=model.state_dict())
    config, states = load_state("runs/x/ckpt", "model")

This is the bottom layer of the library: it imports only the standard library, torch and
safetensors. One writer per folder at a time is assumed (two processes saving the same folder
at once is a race in the caller, not something this module arbitrates).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_folder", "recover", "write_json", "read_json", "save_state", "load_state", "save_tensors",
           "load_tensors", "load_exact", "optimizer_state_to_tensors", "optimizer_state_from_tensors"]

_RENAME_EXCHANGE = 2      # linux/fs.h: swap two existing paths in one step
_AT_FDCWD = -100          # linux/fcntl.h: resolve relative paths from the current directory


# -- siblings are named `.{name}.{kind}-{pid}-{token}`: the pid says whether their writer still runs
def _sibling(path: Path, kind: str) -> Path:
    # 64 random bits: a clash with an existing sibling is not worth a retry loop
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(8)}"


def _siblings(path: Path, kind: str) -> dict[Path, int]:
    """`path`'s siblings of `kind` made by `_sibling`, each with its writer's pid."""
    if not path.parent.is_dir():
        return {}
    # an exact pattern, not a glob: a name may hold glob characters, or extend another's name
    pattern = re.compile(re.escape(f".{path.name}.{kind}-") + r"(\d+)-[0-9a-f]{16}")
    return {p: int(m[1]) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))}


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (then a sibling it made may be in use)."""
    if os.name == "nt":
        return True           # os.kill(pid, 0) would terminate the process there: never guess
    try:
        os.kill(pid, 0)       # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                  # exists, owned by another user
    return True


def _discard(p: Path) -> None:
    """Delete an old copy or a stale partial; a failure is warned about, never hidden."""
    try:
        shutil.rmtree(p)
    except OSError as e:
        warnings.warn(f"could not remove {str(p)!r} ({e}); delete it by hand", stacklevel=2)


# -- durability: a rename is only as durable as the data and directory entries behind it
def _fsync(p, directory: bool = False) -> None:
    if directory and os.name == "nt":
        return                # directories cannot be opened for fsync on Windows
    fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root, topdown=False):   # children before the folder naming them
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                _fsync(os.path.join(d, f))
        _fsync(d, directory=True)


# -- the swap
def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False, changing
    nothing, where unavailable (another OS, glibc < 2.28, a filesystem without support)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap(new: Path, path: Path) -> Path | None:
    """Put `new` at `path`; return where the previous folder now lies (None if there was none)."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return None
    if _exchange(new, path):
        return new                      # the old folder now sits under the partial's name
    old = _sibling(path, "old")
    os.rename(path, old)                # a crash from here to the next rename: see recover()
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


def recover(path) -> Path:
    """Undo a crash between the two renames of a fallback swap; returns `path` as a `Path`.

    If `path` is missing but an `.{name}.old-*` sibling left by a process that no longer runs
    exists, that sibling is the previous folder, whole (renames are atomic), and it is moved
    back. Partial siblings are never used: a save that did not finish is not a folder. Only
    writers (`atomic_folder`) delete leftovers; `recover` (and so `load_state`) never does.

    Args:
        path: the folder, e.g. ``"runs/x/ckpt"``.
    """
    path = Path(path)
    if not os.path.lexists(path):
        olds = [p for p, pid in _siblings(path, "old").items() if p.is_dir() and not _alive(pid)]
        if olds:
            os.rename(max(olds, key=lambda p: p.stat().st_mtime_ns), path)
            _fsync(path.parent, directory=True)
    return path


@contextmanager
def atomic_folder(path, keep: tuple = ()) -> Iterator[Path]:
    """Write a folder all-or-nothing: files go into a hidden sibling that replaces `path` at the end.

    On normal exit every file and directory in the new folder is fsynced, the new folder takes
    the place of the old one (in one step with Linux `renameat2(RENAME_EXCHANGE)`, else with two
    renames that `recover` can undo), the parent is fsynced and the old copy deleted. On any
    exception, `KeyboardInterrupt` included, the partial folder is deleted and `path` is
    untouched. Nested calls on paths inside the yielded folder work.

    Before starting, leftovers of earlier saves of the same `path` are deleted: `.partial-*`
    (and, when `path` exists, `.old-*`) siblings whose writer process (its pid is in the name)
    no longer runs on this machine. A sibling whose writer still runs may be in use: kept.

    Args:
        path: the folder to (re)write. Its parent is created if missing.
        keep: names of files of the old folder to carry into the new one when the save does not
            write them itself (a shipped folder's README.md, say).

    Yields:
        The empty temporary folder to write into.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    for kind in ("partial", "old") if path.exists() else ("partial",):
        for p, pid in _siblings(path, kind).items():
            if not _alive(pid):
                _discard(p)
    tmp = _sibling(path, "partial")
    os.mkdir(tmp)   # not tempfile.mkdtemp: that makes it 0700, and the swapped-in folder keeps its mode
    try:
        yield tmp
        for name in keep:
            if (path / name).is_file() and not (tmp / name).exists():
                shutil.copy2(path / name, tmp / name)
        _fsync_tree(tmp)
        old = _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # best effort; a leftover is cleaned next time
        raise
    _fsync(path.parent, directory=True)
    if old is not None:
        _discard(old)


def write_json(path, obj) -> Path:
    """Write `obj` as JSON (indent 2, trailing newline) atomically; returns `path` as a `Path`.

    Readers see the old file or the new one, never a mix: the text goes to a temporary sibling,
    is fsynced, then renamed over `path`.

    Args:
        path: the file to write.
        obj: anything `json.dumps` accepts.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"   # serialise first: an unserialisable obj touches nothing
    for p, pid in _siblings(path, "tmp").items():   # left by a writer killed mid-write
        if not _alive(pid):
            p.unlink(missing_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        # os.open with 0o666, not mkstemp (0600): the file gets the same mode a plain write would
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync(path.parent, directory=True)
    return path


def read_json(path):
    """Read a JSON file, with an error that names it when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON file at {str(path)!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def _for_safetensors(state: dict) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors, each owning its memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.nbytes:
            v = v.clone()   # tied weights or a view into a larger tensor: give it its own memory
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_tensors(path, state: dict) -> Path:
    """Write one ``.safetensors`` file of a state dict (detached, CPU, contiguous, unshared); inside an
    ``atomic_folder``, where the folder, not the file, is what becomes visible at once."""
    save_file(_for_safetensors(state), str(path))
    # safetensors creates the file 0600; give it the mode a plain write would (0644 under umask 022), so that a
    # checkpoint or an exported model others install or read is readable by them
    os.chmod(path, 0o666 & ~_umask())
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)   # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read one ``.safetensors`` file, with an error naming it when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights file at {str(path)!r}")
    return load_file(str(path), device=str(device))


def load_exact(module: torch.nn.Module, state: dict, where, what: str) -> torch.nn.Module:
    """Load ``state`` into ``module`` only if the names are exactly the module's; else a ValueError that
    names ``where`` (the file), ``what`` (the model) and the first missing and unexpected keys."""
    expected = set(module.state_dict())
    if set(state) != expected:
        raise ValueError(f"{where} does not fit {what}: missing {sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    module.load_state_dict(state)
    return module


def save_state(folder, config: dict, *, keep: tuple = (), **state_dicts) -> Path:
    """Save `config.json` and one `{name}.safetensors` per keyword into `folder`, atomically.

    Tensors are detached, moved to the CPU and made contiguous; tensors sharing memory (tied
    weights) are cloned, since safetensors refuses shared storage. Returns `folder` as a `Path`.

    Args:
        folder: the folder to (re)write, via `atomic_folder`.
        config: JSON-serialisable dict, written as ``config.json``.
        keep: files of the old folder to carry over (see `atomic_folder`).
        **state_dicts: ``name=state_dict``; each is written as ``{name}.safetensors``.
    """
    with atomic_folder(folder, keep) as tmp:
        write_json(tmp / "config.json", config)
        for name, state in state_dicts.items():
            save_tensors(tmp / f"{name}.safetensors", state)
    return Path(folder)


def load_state(folder, *names: str, device="cpu") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Load what `save_state` wrote.

    Args:
        folder: the saved folder (`recover` runs first).
        *names: which ``{name}.safetensors`` to load; none means every one in the folder.
        device: where the tensors go.

    Returns:
        ``(config, {name: state_dict})``.

    Raises:
        FileNotFoundError: naming the folder and the missing file(s).
    """
    folder = recover(folder)
    names = names or tuple(sorted(p.stem for p in folder.glob("*.safetensors")))
    missing = [f for f in ["config.json", *(f"{n}.safetensors" for n in names)] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a saved tld folder: missing {', '.join(missing)}")
    states = {n: load_file(str(folder / f"{n}.safetensors"), device=str(device)) for n in names}
    return read_json(folder / "config.json"), states


# -- optimizer state as safetensors + JSON instead of a pickle
def _encode(v, key: str, tensors: dict):
    # tensors go to `tensors` under `key`; tuples are tagged because JSON has only lists
    if isinstance(v, torch.Tensor):
        tensors[key] = v.detach()
        return {"__tensor__": key}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, f"{key}.{i}", tensors) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_encode(x, f"{key}.{i}", tensors) for i, x in enumerate(v)]
    return v


def _decode(v, tensors: dict):
    if isinstance(v, dict) and "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_decode(x, tensors) for x in v["__tuple__"])
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    return v


def optimizer_state_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a `torch.optim` state_dict into tensors (for safetensors) and JSON metadata.

    Tensors (``exp_avg``, a 0-d ``step``, ...) are keyed ``state.{param}.{name}``; python
    numbers and the param_groups go to the metadata, tuples such as ``betas`` tagged so they
    come back as tuples. `optimizer_state_from_tensors` inverts it exactly.

    Args:
        state_dict: ``optimizer.state_dict()``.

    Returns:
        ``(tensors, meta)``: save `tensors` as a state with `save_state`, `meta` in its config.
    """
    tensors: dict[str, torch.Tensor] = {}
    state = [[k, {n: _encode(v, f"state.{k}.{n}", tensors) for n, v in s.items()}]
             for k, s in state_dict["state"].items()]   # pairs, not a dict: JSON keys would become str
    groups = [{n: _encode(v, f"param_groups.{i}.{n}", tensors) for n, v in g.items()}
              for i, g in enumerate(state_dict["param_groups"])]
    return tensors, {"state": state, "param_groups": groups}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild the state_dict that `optimizer_state_to_tensors` split, for `optimizer.load_state_dict`."""
    return {"state": {k: {n: _decode(v, tensors) for n, v in s.items()} for k, s in meta["state"]},
            "param_groups": [{n: _decode(v, tensors) for n, v in g.items()} for g in meta["param_groups"]]}
