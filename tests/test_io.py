"""Claims of tld.io: a saved folder is written all-or-nothing (an exception, a SIGKILL or a crash
between two renames leaves the previous folder loadable, byte for byte), nests, and round-trips
tensors, JSON and optimizer state exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tld.io as io
from tld.io import (
    atomic_folder,
    load_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    read_json,
    recover,
    save_state,
    write_json,
)

REPO = Path(__file__).parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden partial/old/tmp siblings anywhere under `parent`."""
    return sorted(p.name for p in parent.rglob(".*") if any(f".{k}-" in p.name for k in ("partial", "old", "tmp")))


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(4, dtype=torch.int64) + seed}


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (so siblings carrying it are stale)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.fixture
def previous(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A folder saved once, and its bytes."""
    folder = save_state(tmp_path / "ckpt", {"version": 1}, model=state(1), ema=state(2))
    return folder, snapshot(folder)


def test_save_then_load_round_trips_tensors_and_config_exactly(tmp_path):
    w, e = state(1), state(2)
    folder = save_state(tmp_path / "runs" / "ckpt", {"step": 3, "lr": 1e-3, "name": "x"}, model=w, ema=e)
    assert sorted(os.listdir(folder)) == ["config.json", "ema.safetensors", "model.safetensors"]
    config, states = load_state(folder, "model", "ema")
    assert config == {"step": 3, "lr": 1e-3, "name": "x"}
    for got, want in ((states["model"], w), (states["ema"], e)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert load_state(folder)[1].keys() == {"model", "ema"}   # no names: every .safetensors
    assert leftovers(tmp_path) == []


def test_save_state_accepts_tied_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(4, 4)
    sd = {"a": w, "tied": w, "t": w.t(), "row": w[1]}   # shared storage, a transpose, a view
    _, states = load_state(save_state(tmp_path / "f", {}, model=sd))
    assert all(torch.equal(states["model"][k], v) for k, v in sd.items())


def test_save_interrupted_after_first_file_keeps_previous_folder(previous):
    folder, before = previous
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(folder) as tmp:
        write_json(tmp / "config.json", {"version": 2})
        raise RuntimeError("disk full")
    assert snapshot(folder) == before
    assert leftovers(folder.parent) == []


def test_keyboard_interrupt_mid_save_keeps_previous_folder(previous):
    folder, before = previous
    with pytest.raises(KeyboardInterrupt), atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert snapshot(folder) == before and leftovers(folder.parent) == []


def test_save_killed_by_sigkill_keeps_previous_folder_and_next_save_cleans_up(previous):
    folder, before = previous
    # the child dies inside save_state, right after its first .safetensors file is on disk
    code = (
        "import os, signal, sys, torch\n"
        "import tld.io as io\n"
        "real = io.save_file\n"
        "def save_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "io.save_file = save_then_die\n"
        "io.save_state(sys.argv[1], {'version': 2}, model={'w': torch.zeros(3)}, ema={'w': torch.ones(3)})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, timeout=300, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    stale = leftovers(folder.parent)
    assert len(stale) == 1 and ".partial-" in stale[0]   # the dead save's half folder, hidden
    assert snapshot(folder) == before
    config, states = load_state(folder, "model", "ema")
    assert config == {"version": 1} and torch.equal(states["model"]["w"], state(1)["w"])

    save_state(folder, {"version": 3}, model=state(3))
    assert load_state(folder)[0] == {"version": 3} and sorted(os.listdir(folder))[1:] == ["model.safetensors"]
    assert leftovers(folder.parent) == []


def test_nested_atomic_folders_write_a_whole_pipeline(tmp_path):
    pipe = tmp_path / "pipeline"
    for version in (1, 2):   # the second pass replaces a pipeline that exists, sub-folders included
        with atomic_folder(pipe) as tmp:
            write_json(tmp / "config.json", {"version": version})
            save_state(tmp / "text_encoder", {"dim": 8}, model=state(version))
            with atomic_folder(tmp / "codec") as codec:
                write_json(codec / "config.json", {"scale": 0.5})
                (codec / "tokenizer.json").write_text("{}")
        assert read_json(pipe / "config.json") == {"version": version}
        assert torch.equal(load_state(pipe / "text_encoder", "model")[1]["model"]["w"], state(version)["w"])
        assert sorted(os.listdir(pipe / "codec")) == ["config.json", "tokenizer.json"]
        assert leftovers(tmp_path) == []


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not io._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable here: the fallback is tested below")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_two_rename_fallback_replaces_a_folder(previous, monkeypatch):
    folder, before = previous
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    save_state(folder, {"version": 2}, model=state(5))
    config, states = load_state(folder, "model")
    assert config == {"version": 2} and torch.equal(states["model"]["w"], state(5)["w"])
    assert not (folder / "ema.safetensors").exists()   # replaced whole, not merged
    assert leftovers(folder.parent) == []


def test_recover_restores_a_folder_when_a_crash_left_only_the_old_sibling(previous, dead_pid):
    folder, before = previous
    # the fallback's first rename, done by a process that then died before the second
    os.rename(folder, folder.parent / f".{folder.name}.old-{dead_pid}-{'0' * 16}")
    assert not folder.exists()
    config, states = load_state(folder, "model", "ema")   # load_state recovers first
    assert config == {"version": 1} and snapshot(folder) == before
    assert leftovers(folder.parent) == []


def test_recover_leaves_the_old_sibling_of_a_running_writer_alone(previous):
    folder, _ = previous
    old = folder.parent / f".{folder.name}.old-{os.getpid()}-{'0' * 16}"   # mid-swap in a live process
    os.rename(folder, old)
    assert recover(folder) == folder and not folder.exists() and old.is_dir()


def test_stale_partials_of_dead_writers_are_removed_and_live_ones_kept(previous, dead_pid):
    folder, before = previous
    dead = folder.parent / f".{folder.name}.partial-{dead_pid}-{'1' * 16}"
    live = folder.parent / f".{folder.name}.partial-{os.getpid()}-{'2' * 16}"
    other = folder.parent / f".{folder.name}x.partial-{dead_pid}-{'3' * 16}"   # another folder's
    for p in (dead, live, other):
        p.mkdir()
    save_state(folder, {"version": 2}, model=state(2))
    assert not dead.exists() and live.is_dir() and other.is_dir()


def test_failing_to_remove_the_old_copy_warns_with_its_path(previous, monkeypatch):
    folder, _ = previous

    def refuse(p, *a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(io.shutil, "rmtree", refuse)
    with pytest.warns(UserWarning, match=r"could not remove .*\.ckpt\.(partial|old)-"):
        save_state(folder, {"version": 2}, model=state(2))
    monkeypatch.undo()
    assert load_state(folder)[0] == {"version": 2}


def test_write_json_keeps_old_content_when_serialisation_fails(tmp_path):
    path = write_json(tmp_path / "config.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def test_load_state_error_names_the_folder_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nothing' is not a saved tld folder: missing config\.json"):
        load_state(tmp_path / "nothing")
    folder = save_state(tmp_path / "ckpt", {}, model=state(0))
    with pytest.raises(FileNotFoundError, match=r"missing ema\.safetensors"):
        load_state(folder, "model", "ema")
    with pytest.raises(FileNotFoundError, match="no JSON file at"):
        read_json(tmp_path / "missing.json")


def test_adamw_state_round_trips_so_the_next_step_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    assert isinstance(opt.state_dict()["state"][0]["step"], torch.Tensor)   # torch >= 2: a 0-d tensor
    save_state(tmp_path / "ckpt", {"optimizer": meta}, model=model.state_dict(), optimizer=tensors)

    config, states = load_state(tmp_path / "ckpt", "model", "optimizer")
    model2 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 2))
    model2.load_state_dict(states["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)   # hyperparameters come from the save
    opt2.load_state_dict(optimizer_state_from_tensors(states["optimizer"], config["optimizer"]))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2

    step(model, opt)
    step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_optimizer_state_with_python_number_steps_round_trips():
    sd = {"state": {0: {"step": 3, "momentum_buffer": torch.ones(2)}, 2: {"step": 4.0}},
          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1, 2]}]}
    tensors, meta = optimizer_state_to_tensors(sd)
    back = optimizer_state_from_tensors(tensors, json.loads(json.dumps(meta)))
    assert back["state"][0]["step"] == 3 and isinstance(back["state"][0]["step"], int)
    assert back["state"][2]["step"] == 4.0 and isinstance(back["state"][2]["step"], float)
    assert torch.equal(back["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["param_groups"] == sd["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)


def test_saved_tensors_get_the_mode_a_plain_write_would(tmp_path):
    import stat

    plain = tmp_path / "plain"
    plain.write_text("x")
    folder = save_state(tmp_path / "ckpt", {"step": 1}, model={"w": torch.zeros(2)})
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want & 0o044, "the test needs a umask that lets others read"
    for f in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((folder / f).stat().st_mode) == want, f   # safetensors alone would give 0600
