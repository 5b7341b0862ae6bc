"""The training loop: config errors, exact resume, NaN safety, atomic checkpoints, processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tld import train as T
from tld.samplers import generate

REPO = Path(__file__).resolve().parent.parent


def smoke(tmp_path, name="run", *args):
    return T.config_from_args(["preset=smoke", f"out_dir={tmp_path / name}", "progress=false", *args])


def weights(run_dir, step, which="model"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:07d}" / f"{which}.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# --- configuration --------------------------------------------------------------------------

def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*smoke"):
        T.config_from_args(["preset=nope"])


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown config key 'max_step'.*max_steps"):
        T.config_from_args(["preset=smoke", "max_step=3"])


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="'max_steps' expects a int, got 'many'"):
        T.config_from_args(["max_steps=many"])
    with pytest.raises(ValueError, match="schedule='cosine' is not one of"):
        T.config_from_args(["schedule=cosine"])
    with pytest.raises(ValueError, match="expected key=value"):
        T.config_from_args(["smoke"])
    with pytest.raises(ValueError, match=r"sample_guidance_interval='0.8,0.2': expected 0 <= lo < hi <= 1"):
        T.config_from_args(["preset=smoke", "sample_guidance_interval=0.8,0.2"])


def test_keys_and_model_overrides_parse():
    cfg = T.config_from_args(["preset=smoke", "max_steps=7", "lr=3e-4", "resume=true", "model.depth=4"])
    assert (cfg.max_steps, cfg.lr, cfg.resume, cfg.model_overrides) == (7, 3e-4, True, {"depth": 4})
    assert cfg.model == "uvit-tiny"  # from the preset


def test_another_model_drops_the_preset_s_model_overrides():
    # cpu-lesson's overrides (patch_size, conv_mlp, ...) are U-ViT arguments that a U-DiT does not take
    assert T.config_from_args(["preset=cpu-lesson"]).model_overrides["conv_mlp"] is False
    udit = T.config_from_args(["preset=cpu-lesson", "model=udit-course", "model.embed_dim=16"])
    assert (udit.model, udit.model_overrides, udit.image_size) == ("udit-course", {"embed_dim": 16}, 16)
    same = T.config_from_args(["preset=cpu-lesson", "model=uvit-course", "model.depth=2"])
    assert same.model_overrides == {"patch_size": 4, "embed_dim": 64, "depth": 2, "conv_mlp": False}


def test_cli_reports_errors_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "tld.train", "preset=nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown preset 'nope'" in out.stderr and "Traceback" not in out.stderr


# --- the loop -------------------------------------------------------------------------------

def test_smoke_run_writes_checkpoint_samples_and_log(tmp_path):
    summary = T.train(smoke(tmp_path))
    run = tmp_path / "run"
    assert summary["steps"] == 20
    assert (run / "checkpoints" / "latest.json").exists()
    assert (run / "samples" / "step_0000020.png").stat().st_size > 100
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert log[-1]["loss"] < log[0]["loss"], "the loss should fall over 20 steps"
    # no temporary folders left behind by the atomic write
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_the_sample_grid_is_guided_only_inside_sample_guidance_interval(tmp_path):
    from dataclasses import replace

    from PIL import Image

    cfg = smoke(tmp_path, "run", "class_dropout=0.2")
    T.train(cfg)
    ema = T.load_model(tmp_path / "run")
    grid = {}
    for name, guidance, interval in [("plain", 1.0, ""), ("every", 3.0, ""), ("all", 3.0, "0,1"), ("late", 3.0, "0.5,1")]:
        path = T.save_samples(ema, replace(cfg, sample_guidance=guidance, sample_guidance_interval=interval), 18,
                              tmp_path / f"{name}.png")
        grid[name] = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
    assert torch.equal(grid["all"], grid["every"])            # an interval holding every time is plain guidance
    assert not torch.equal(grid["late"], grid["every"]) and not torch.equal(grid["late"], grid["plain"])
    assert T.config_from_args(["preset=cpu-demo"]).sample_guidance_interval == "0.3,1"   # as make demo samples


# a GPU sums some gradients with atomics: bit-identical reruns there need deterministic=true
DET = ("deterministic=true",) if torch.cuda.is_available() else ()


def test_resume_is_bit_identical(tmp_path):
    """N steps straight == N/2 steps, stop, resume, N/2 more: same weights, EMA and optimizer."""
    T.train(smoke(tmp_path, "straight", *DET))
    T.train(smoke(tmp_path, "resumed", "stop_at=10", *DET))
    assert json.loads((tmp_path / "resumed/checkpoints/latest.json").read_text())["step"] == 10
    T.train(smoke(tmp_path, "resumed", "resume=true", *DET))
    for which in ("model", "ema"):
        assert_same_weights(weights(tmp_path / "straight", 20, which), weights(tmp_path / "resumed", 20, which))
    log_a = (tmp_path / "straight/log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "resumed/log.jsonl").read_text().splitlines()
    loss = lambda lines: [json.loads(x)["loss"] for x in lines]
    assert loss(log_a) == loss(log_b), "the resumed loss curve must continue the same curve"


def test_an_fp16_resume_continues_at_the_saved_loss_scale(tmp_path):
    """fp16 training scales the loss (GradScaler) and grows the scale as it goes; a resume that restarted
    at the initial scale would underflow and skip steps differently from the run it continues."""
    from accelerate import Accelerator

    def accelerator():  # fp16's scaler, on a CPU (accelerate makes one only on a GPU); it doubles every 2 steps
        acc = Accelerator(cpu=True)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        return acc

    straight = accelerator()
    T.train(smoke(tmp_path, "straight", "max_steps=8"), accelerator=straight)
    T.train(smoke(tmp_path, "resumed", "max_steps=8", "stop_at=4"), accelerator=accelerator())
    saved = json.loads((tmp_path / "resumed/checkpoints/step_0000004/config.json").read_text())["grad_scaler"]
    assert saved["scale"] == 2.0**12
    resumed = accelerator()
    T.train(smoke(tmp_path, "resumed", "max_steps=8", "resume=true"), accelerator=resumed)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale() == 2.0**14


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    T.train(smoke(tmp_path, "run", "stop_at=5"))
    with pytest.raises(ValueError, match="was made for model 'uvit-tiny'"):
        T.train(smoke(tmp_path, "run", "resume=true", "model.embed_dim=64"))


def test_init_from_starts_model_and_ema_at_a_folder_s_ema_weights(tmp_path):
    T.train(smoke(tmp_path, "base", "max_steps=5"))
    trained = weights(tmp_path / "base", 5, "ema")
    run = T.setup(smoke(tmp_path, "tuned", f"init_from={tmp_path / 'base'}", "seed=1"))
    T.build(run)
    for module in (run.model, run.ema):
        assert_same_weights(module.state_dict(), trained)
    fresh = T.setup(smoke(tmp_path, "fresh", "seed=1"))
    T.build(fresh)   # without init_from, seed 1 starts elsewhere: the check above can fail
    assert not all(torch.equal(v, trained[k]) for k, v in fresh.model.state_dict().items())
    assert run.start_step == 0 and run.optimizer.state == {}
    with pytest.raises(ValueError, match=r"init_from=.*holds model 'uvit-tiny' with .*embed_dim"):
        T.build(T.setup(smoke(tmp_path, "other", f"init_from={tmp_path / 'base'}", "model.embed_dim=64")))


def test_a_copied_checkpoint_pointed_at_resumes_the_same_curve(tmp_path):
    from tld.runs import checkpoint_folder, point_latest
    T.train(smoke(tmp_path, "run", "save_every=10", *DET))
    shutil.copytree(checkpoint_folder(tmp_path / "run", 10), checkpoint_folder(tmp_path / "copy", 10))
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5 in"):
        point_latest(tmp_path / "copy", 5)
    point_latest(tmp_path / "copy", 10)
    assert T.train(smoke(tmp_path, "copy", "save_every=10", "resume=true", *DET))["steps_this_run"] == 10
    for which in ("model", "ema"):
        assert_same_weights(weights(tmp_path / "run", 20, which), weights(tmp_path / "copy", 20, which))


def test_shapes_positions_keeps_only_the_named_positions(tmp_path):
    from tld.data import ShapesDataset
    ds = T.build_dataset(smoke(tmp_path, "c", "shapes_positions=center, top left"))
    assert ds.positions == ("center", "top left")
    full = ShapesDataset(size=16)
    centers = {(round(float(ds.params(i)[3])), round(float(ds.params(i)[4]))) for i in range(200)}
    assert len(centers) < len({(round(float(full.params(i)[3])), round(float(full.params(i)[4]))) for i in range(200)})
    assert {ds[i]["caption"].split(" ", 3)[-1] for i in range(50)} == {"in the center", "at the top left"}
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        T.build_dataset(smoke(tmp_path, "m", "shapes_positions=middle"))


def test_deterministic_switch_is_restored_after_the_run(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    T.train(smoke(tmp_path, "a", "max_steps=2", "deterministic=true"))
    assert not torch.are_deterministic_algorithms_enabled()


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    T.train(smoke(tmp_path, "a", "max_steps=5", *DET))
    T.train(smoke(tmp_path, "b", "max_steps=5", *DET))
    T.train(smoke(tmp_path, "c", "max_steps=5", "seed=1", *DET))
    assert_same_weights(weights(tmp_path / "a", 5), weights(tmp_path / "b", 5))
    a, c = weights(tmp_path / "a", 5), weights(tmp_path / "c", 5)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    T.train(smoke(tmp_path, "big", "max_steps=5"))
    T.train(smoke(tmp_path, "acc", "max_steps=5", "grad_accum=4"))
    assert_same_weights(weights(tmp_path / "big", 5), weights(tmp_path / "acc", 5), atol=1e-5)


def test_gradient_clipping_bounds_the_global_norm_the_optimizer_steps_with(tmp_path, monkeypatch):
    """With the loss scaled by 1e4 the raw gradient norm is far above grad_clip; at optimizer.step time
    the loop must hand over the same gradients rescaled to global norm grad_clip (direction kept)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    real_loss = T.diffusion.loss
    monkeypatch.setattr(T.diffusion, "loss", lambda *a, **kw: real_loss(*a, **kw) * 1e4)
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.cat(
        [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None])))
    try:
        runs = {}
        for clip in (0.0, 0.5):
            seen.clear()
            T.train(smoke(tmp_path, f"clip{clip}", "max_steps=2", f"grad_clip={clip}", "sample_steps=1"))
            runs[clip] = list(seen)
    finally:
        hook.remove()
    assert [len(g) for g in runs.values()] == [2, 2]
    raw, clipped = runs[0.0][0], runs[0.5][0]   # step 0: same weights, batch and noise in both runs
    assert raw.norm() > 100 * 0.5, raw.norm()   # a case where clipping has something to do
    for g in runs[0.5]:
        assert g.norm() <= 0.5 + 1e-6, g.norm()
    torch.testing.assert_close(clipped, raw * (0.5 / raw.norm()), rtol=1e-4, atol=1e-9)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    T.train(smoke(tmp_path, "run", "stop_at=10", "save_every=5"))
    good = weights(tmp_path / "run", 10)
    real_loss = T.diffusion.loss

    def poisoned(pred, *args, **kwargs):
        out = real_loss(pred, *args, **kwargs)
        return out * float("nan")

    monkeypatch.setattr(T.diffusion, "loss", poisoned)
    with pytest.raises(T.NonFiniteLoss, match=r"loss became nan at step 10.*step_0000010"):
        T.train(smoke(tmp_path, "run", "resume=true", "save_every=5"))
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 10
    assert_same_weights(good, weights(tmp_path / "run", 10))


def test_keeps_only_the_newest_checkpoints(tmp_path):
    T.train(smoke(tmp_path, "run", "save_every=5", "keep_checkpoints=2"))
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
    assert kept == ["step_0000015", "step_0000020"]


def test_a_checkpoint_that_cannot_be_deleted_is_warned_about_and_training_goes_on(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree
    tried = []

    def refuse(path, *args, **kwargs):
        tried.append(Path(path))
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)   # tld.runs and tld.io both call shutil.rmtree
    args = ["max_steps=6", "save_every=2", "keep_checkpoints=1", "sample_steps=2"]
    with pytest.warns(UserWarning) as caught:
        summary = T.train(smoke(tmp_path, "run", *args))
    ckpts = tmp_path / "run" / "checkpoints"
    assert summary["steps"] == 6
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 6
    # each save tried to delete every older checkpoint, and each failure names its folder
    messages = [str(w.message) for w in caught if "could not delete the old checkpoint" in str(w.message)]
    assert tried == [ckpts / "step_0000002", ckpts / "step_0000002", ckpts / "step_0000004"], tried
    for path, message in zip(tried, messages, strict=True):
        assert f"could not delete the old checkpoint {path}: [Errno 13] Permission denied" in message, message
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000006"]
    assert T.load_model(tmp_path / "run") is not None
    # once deleting works again, the next save clears the leftovers too
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    T.train(smoke(tmp_path, "run", *args[1:], "max_steps=7", "resume=true"))
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000007"]


def test_load_model_round_trip_and_clear_errors(tmp_path):
    T.train(smoke(tmp_path))
    model = T.load_model(tmp_path / "run")
    ema = weights(tmp_path / "run", 20, "ema")
    assert_same_weights({k: v for k, v in model.state_dict().items()}, ema)
    with pytest.raises(FileNotFoundError, match="not a tld checkpoint"):
        T.load_model(tmp_path)
    images = T.generate(model, model.train_config, torch.tensor([0, 5]), steps=3)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    # they are the samples of the run's schedule and prediction (smoke: vp-cosine, v), not the defaults
    cfg = model.train_config
    assert (cfg["schedule"], cfg["prediction"]) == ("vp-cosine", "v")
    same = generate(model, "vp-cosine", prediction="v", cond=torch.tensor([0, 5]), steps=3)
    torch.testing.assert_close(images, same, atol=0, rtol=0)
    assert (images - generate(model, "vp-cosine", prediction="eps", cond=torch.tensor([0, 5]), steps=3)).abs().max() > 0.1


def test_lr_warmup_then_cosine():
    cfg = T.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert T.lr_at(cfg, 0) == pytest.approx(0.1)
    assert T.lr_at(cfg, 9) == pytest.approx(1.0)
    assert T.lr_at(cfg, 60) == pytest.approx(0.55)
    assert T.lr_at(cfg, 110) == pytest.approx(0.1)


def test_ema_update_moves_toward_the_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    T.ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight)


def test_step_batches_cover_the_global_batch_whatever_the_process_count():
    one = list(T.StepBatchSampler(100, 8, 0, rank=0, world=1, accum=1, start_step=0, max_steps=3))
    two = [list(T.StepBatchSampler(100, 8, 0, rank=r, world=2, accum=2, start_step=0, max_steps=3)) for r in (0, 1)]
    for step in range(3):
        union = sorted(i for r in (0, 1) for a in range(2) for i in two[r][step * 2 + a])
        assert union == sorted(one[step])
    with pytest.raises(ValueError, match="divisible by processes x grad_accum"):
        T.StepBatchSampler(100, 6, 0, 0, 4, 1, 0, 1)


def test_import_tld_initialises_no_cuda():
    code = ("import torch, tld, tld.train, tld.models, tld.samplers, tld.data; "
            "import torch.cuda; print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    """accelerate launch with 2 CPU processes (gloo): same global batch, same weights as 1 process."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    args = ["preset=smoke", "progress=false", "max_steps=10"]
    T.train(T.config_from_args(args + [f"out_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tld.train", *args,
           f"out_dir={tmp_path / 'two'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "two/summary.json").read_text())["num_processes"] == 2
    assert_same_weights(weights(tmp_path / "one", 10), weights(tmp_path / "two", 10), atol=1e-5)
    # only the main process writes: one log line per log_every, one sample grid
    steps = [json.loads(x)["step"] for x in (tmp_path / "two/log.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_text_conditioning_on_shapes_trains_its_encoders_caches_and_saves_a_pipeline(tmp_path):
    from tld.pipeline import TextToImage

    args = ("conditioning=text", "text_encoder=tinyclip", "encoder_steps=5", "codec=tiny-vae", "vae_steps=5",
            "cache_items=64", "max_steps=3", "sample_steps=2", "sample_guidance=3", "sample_guidance_interval=0.5,1")
    summary = T.train(smoke(tmp_path, "t2i", *args))
    run = tmp_path / "t2i"
    assert summary["steps"] == 3
    assert (run / "text_encoder" / "config.json").is_file() and (run / "codec").is_dir()
    caches = [p for p in (run / "cache").iterdir() if (p / "meta.json").is_file()]
    assert len(caches) == 1
    pipe = TextToImage.from_pretrained(run / "pipeline")
    assert pipe.config["null"] == "zero" and pipe.config["condition"] == "pooled"
    assert (pipe.config["guidance"], pipe.config["guidance_interval"]) == (3.0, [0.5, 1.0])   # the run's sampling
    assert pipe.denoiser.img_size == 8 and pipe.denoiser.in_chans == 4  # 16 px images -> 8 x 8 x 4 latents
    images = pipe(["a red circle at the top left"], steps=2)
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    # a resumed run reuses the saved encoders and the cache instead of training or encoding again
    stamp = (run / "text_encoder" / "config.json").stat().st_mtime_ns
    T.train(smoke(tmp_path, "t2i", *args, "resume=true", "max_steps=4"))
    assert (run / "text_encoder" / "config.json").stat().st_mtime_ns == stamp
    assert len([p for p in (run / "cache").iterdir() if (p / "meta.json").is_file()]) == 1


def test_text_conditioning_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="needs text_encoder=tinyclip"):
        T.train(smoke(tmp_path, "a", "conditioning=text"))
    with pytest.raises(ValueError, match="used with conditioning=text"):
        T.train(smoke(tmp_path, "b", "text_encoder=tinyclip"))
    with pytest.raises(FileNotFoundError, match="text_encoder='/nowhere'"):
        T.train(smoke(tmp_path, "c", "conditioning=text", "text_encoder=/nowhere"))


def test_class_conditioning_with_a_codec_trains_on_latents_and_exports_its_codec(tmp_path):
    """Latent diffusion with labels (the shipped shapes-cond's recipe): codec= on a class run encodes the images
    once, trains on the latents with the labels, and an exported model carries the codec that decodes it."""
    from tld.autoencoder import load_codec
    from tld.demo import export
    from tld.evaluate import _load_generator
    from tld.runs import codec_folder, load_model

    summary = T.train(smoke(tmp_path, "lat", "codec=tiny-vae", "vae_steps=5", "cache_items=64", "max_steps=3",
                            "sample_steps=2"))
    run = tmp_path / "lat"
    assert summary["steps"] == 3 and (run / "codec" / "tld_codec.json").is_file()
    model = load_model(run)
    assert (model.in_chans, model.img_size, model.num_classes) == (4, 8, 18)   # 16 px -> 8 x 8 x 4, 18 classes
    cache = next(p for p in (run / "cache").iterdir() if (p / "meta.json").is_file())
    labels = np.load(cache / "labels.npy")
    assert len(labels) == 64 and labels.min() >= 0 and labels.max() < 18 and len(set(labels.tolist())) > 5
    assert codec_folder(run) == run / "codec"
    assert codec_folder(run / "checkpoints" / "step_0000003") == run / "codec"
    shipped = export(run, tmp_path / "shipped")
    assert (shipped / "codec" / "tld_codec.json").is_file() and codec_folder(shipped) == shipped / "codec"
    export(shipped, shipped)   # re-exporting an exported folder onto itself keeps its codec
    assert codec_folder(shipped) == shipped / "codec"
    kind, gen, decode, _ = _load_generator(str(shipped), "", "cpu")
    latents = generate(gen, "vp-cosine", prediction="x0", cond=torch.tensor([0, 17]), steps=2)
    images = decode(latents)
    assert kind == "class" and latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, load_codec(run / "codec").decode(latents))
    # the shapes report judges the decoded samples, decoded from latents that were never clipped to [-1, 1]
    from tld.evaluate import generate_for_eval, load_for_eval
    kind, model = load_for_eval(shipped)
    got, asked = generate_for_eval(kind, model, 2, steps=2, guidance=1.0, sampler="ddim", seed=0)
    tc = model.train_config
    raw = generate(model, tc["schedule"], prediction=tc["prediction"], cond=asked["labels"], steps=2, seed=0, clamp=False)
    torch.testing.assert_close(got, (load_codec(shipped / "codec").decode(raw).clamp(-1, 1) + 1) / 2)
    assert got.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="already encoded"):
        T.train(smoke(tmp_path, "p", "dataset=prepared", "data_root=/nowhere", "codec=tiny-vae"))
    with pytest.raises(ValueError, match="text_encoder is used with conditioning=text"):
        T.train(smoke(tmp_path, "c", "text_encoder=tinyclip", "codec=tiny-vae"))
    # a pixel model has no codec
    pixel = T.train(smoke(tmp_path, "px", "max_steps=1"))
    assert pixel["steps"] == 1 and codec_folder(tmp_path / "px") is None


def test_t_max_train_keeps_every_training_time_at_or_below_it():
    from tld.config import TrainConfig, validate
    low = TrainConfig(t_max_train=0.4)
    validate(low)
    t = torch.cat([T.step_randomness(low, step, (64, 3, 8, 8), 18)[0] for step in range(20)])
    assert t.max() <= 0.4 and t.max() > 0.35 and t.min() >= 0, (t.min(), t.max())
    whole = torch.cat([T.step_randomness(TrainConfig(), step, (64, 3, 8, 8), 18)[0] for step in range(20)])
    assert whole.max() > 0.9   # without it the whole range is drawn
    with pytest.raises(ValueError, match=r"t_max_train=1.5 must be 0 .* or in \("):
        validate(TrainConfig(t_max_train=1.5))


def test_tiny_vae_fine_tunes_its_decoder_when_asked_and_keeps_its_latents():
    from tld.data import ShapesDataset
    from tld.training_data import tiny_vae

    keys = ["conditioning=text", "text_encoder=tinyclip", "codec=tiny-vae", "vae_steps=5", "image_size=16"]
    plain = tiny_vae(T.config_from_args(keys))
    tuned = tiny_vae(T.config_from_args([*keys, "vae_decoder_steps=3"]))
    x = ShapesDataset(size=16, seed=5, length=8).batch(range(8))["image"]
    with torch.no_grad():
        torch.testing.assert_close(tuned.encode(x), plain.encode(x), rtol=0, atol=0)   # the same VAE, then...
        assert not torch.equal(tuned.decode(tuned.encode(x)), plain.decode(plain.encode(x)))   # ...a new decoder
    assert tuned.scale == plain.scale
    assert T.config_from_args(["preset=shapes-t2i"]).vae_decoder_steps == 3000   # as the shipped codec was made
    with pytest.raises(ValueError, match="vae_decoder_steps must be >= 0.*got -1"):
        T.config_from_args([*keys, "vae_decoder_steps=-1"])
