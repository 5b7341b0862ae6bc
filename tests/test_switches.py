"""Speed and memory switches change no result; GPU recipes build; each rank draws its own noise."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tld import diffusion
from tld import train as T
from tld.models import create


def smoke(tmp_path, name, *args):
    return T.config_from_args(["preset=smoke", f"out_dir={tmp_path / name}", "progress=false", *args])


def final_weights(run_dir):
    step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def log_losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "log.jsonl").read_text().splitlines()]


# --- gradient checkpointing: the same loss and gradients, on every model family -------------

TINY = {
    "uvit": ("uvit-tiny", dict(), 18),
    "dit": ("dit-course", dict(img_size=16, embed_dim=32, depth=2, num_heads=2), 18),
    "udit": ("udit-course", dict(img_size=16, embed_dim=16, depth=(1, 1, 1, 1, 1)), 18),
    "tld": ("tld-course", dict(img_size=16, embed_dim=32, depth=2, head_dim=16, noise_embed_dim=16), 18),
}


def loss_and_grads(model, checkpointing: bool):
    model.gradient_checkpointing = checkpointing
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, model.in_chans, model.img_size, model.img_size, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(4, generator=g)
    cond = torch.randint(0, model.num_classes, (4,), generator=g)
    schedule = diffusion.get_schedule("vp-cosine")
    loss = diffusion.loss(model(diffusion.add_noise(x0, eps, t, schedule), t, cond), x0, eps, t, schedule, "v").mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(TINY))
def test_gradient_checkpointing_changes_no_loss_or_gradient(family):
    name, kw, classes = TINY[family]
    torch.manual_seed(0)
    model = create(name, num_classes=classes, **kw)
    assert hasattr(model, "gradient_checkpointing"), f"{name} has no gradient_checkpointing switch"
    for p in model.parameters():  # zero-init heads (DiT) would make every gradient but the head's zero
        p.data.add_(0.02 * torch.randn_like(p))
    loss_a, grads_a = loss_and_grads(model, False)
    loss_b, grads_b = loss_and_grads(model, True)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_gradient_checkpointing_actually_recomputes():
    """The switch is honoured: with it, a block's forward runs again during backward."""
    torch.manual_seed(0)
    model = create("uvit-tiny")
    calls = []
    model.in_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for on, runs in ((False, 1), (True, 2)):
        calls.clear()
        loss_and_grads(model, on)
        assert len(calls) == runs, f"gradient_checkpointing={on}: the block ran {len(calls)} times, expected {runs}"


def test_gradient_checkpointing_in_the_loop_gives_the_same_weights(tmp_path):
    T.train(smoke(tmp_path, "plain", "max_steps=3"))
    T.train(smoke(tmp_path, "ckpt", "max_steps=3", "gradient_checkpointing=true"))
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# --- attention backend ----------------------------------------------------------------------

def test_math_and_sdpa_attention_train_to_the_same_loss(tmp_path):
    T.train(smoke(tmp_path, "sdpa", "max_steps=5", "attn_backend=sdpa"))
    T.train(smoke(tmp_path, "math", "max_steps=5", "attn_backend=math"))
    la, lb = log_losses(tmp_path / "sdpa"), log_losses(tmp_path / "math")
    assert len(la) == 1
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
    a, b = final_weights(tmp_path / "sdpa"), final_weights(tmp_path / "math")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# --- mixed precision (GPU in practice; on a CPU when it has bf16 kernels) ---------------------

def bf16_unsupported_reason() -> str:
    """Why bf16 cannot run on the trainer's device here, checked before the test ('' when it can).

    Only the precise conditions: no bf16 kernels (a tiny autocast matmul probe fails or does not
    give bf16), or a CPU without native bf16 (no AVX512-BF16 / AMX: emulated bf16 takes minutes;
    TLD_TEST_BF16=1 runs it anyway). Anything the trainer does wrong afterwards fails the test.
    """
    if torch.cuda.is_available():
        return "" if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    a = torch.ones(4, 4)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = a @ a
    except RuntimeError as e:   # the probe only: a 4x4 matmul, not the code under test
        return f"this CPU has no bf16 kernels: {e}"
    if out.dtype != torch.bfloat16:
        return f"bf16 autocast on this CPU leaves a matmul in {out.dtype}"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported() and not os.environ.get("TLD_TEST_BF16"):
        return "this CPU has no native bf16 (AVX512-BF16 / AMX); emulated it takes minutes: set TLD_TEST_BF16=1"
    return ""


def test_bf16_mixed_precision_trains_to_nearly_the_same_loss(tmp_path):
    why = bf16_unsupported_reason()
    if why:
        pytest.skip(why)
    T.train(smoke(tmp_path, "fp32", "max_steps=5"))
    if torch.cuda.is_available():  # the trainer uses the GPU: no warning
        T.train(smoke(tmp_path, "bf16", "max_steps=5", "mixed_precision=bf16"))
    else:
        with pytest.warns(UserWarning, match="mixed_precision=bf16 on a CPU"):
            T.train(smoke(tmp_path, "bf16", "max_steps=5", "mixed_precision=bf16"))
    la, lb = log_losses(tmp_path / "fp32"), log_losses(tmp_path / "bf16")
    # bf16 keeps 8 bits of mantissa: the loss agrees to a few percent, not to fp32 precision
    assert lb == pytest.approx(la, rel=0.05)


# --- torch.compile --------------------------------------------------------------------------

def compile_unsupported_reason(backend: str) -> str:
    """Why torch.compile(backend=...) cannot run here, checked before the test ('' when it can):
    dynamo unsupported on this Python / platform, or the backend not registered in this torch."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on this platform (Python {sys.version.split()[0]}, torch {torch.__version__})"
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return f"torch.compile backend {backend!r} is not available in torch {torch.__version__}"
    return ""


def compiled_matches_eager(backend: str):
    why = compile_unsupported_reason(backend)
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    model = create("uvit-tiny")
    loss_a, grads_a = loss_and_grads(model, False)
    compiled = torch.compile(model, backend=backend)
    loss_b, grads_b = loss_and_grads(compiled, False)   # any failure here is a failure, not a skip
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert len(grads_b) == len(grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b.get(k, grads_b.get(f"_orig_mod.{k}")), grads_a[k], atol=1e-5, rtol=1e-4)


def test_compiled_model_gives_the_same_loss_and_gradients():
    """Dynamo capture + AOTAutograd (the graph torch.compile trains), without C++ code generation."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_model_gives_the_same_loss_and_gradients():
    # inductor compiles C++ kernels: ~4 minutes for a tiny model on 2 loaded CPU cores, seconds on a GPU box
    if not os.environ.get("TLD_TEST_INDUCTOR") and not torch.cuda.is_available():
        pytest.skip("inductor on a CPU takes minutes (C++ compilation); set TLD_TEST_INDUCTOR=1 to run it")
    if not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("cc"):
        pytest.skip("torch.compile (inductor) needs a C++ compiler on a CPU; none found")
    compiled_matches_eager("inductor")


# --- GPU recipes ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["uvit-s2-cifar10", "dit-xl2-imagenet", "tld-256", "uvit-t2i"])
def test_gpu_recipe_builds_and_stops_clearly_without_its_data(preset, tmp_path):
    cfg = T.config_from_args([f"preset={preset}", f"out_dir={tmp_path / 'run'}", "progress=false"])
    assert cfg.dataset == "prepared" and cfg.max_steps >= 260_000 and cfg.mixed_precision == "bf16"
    with pytest.raises(FileNotFoundError, match="does not exist.*not shipped"):
        T.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gpu_recipes_follow_the_papers():
    uvit = T.config_from_args(["preset=uvit-s2-cifar10"])
    assert (uvit.lr, uvit.weight_decay, uvit.beta1, uvit.beta2, uvit.warmup_steps, uvit.batch_size,
            uvit.ema_decay) == (2e-4, 0.03, 0.99, 0.999, 2500, 128, 0.9999)
    dit = T.config_from_args(["preset=dit-xl2-imagenet"])
    assert (dit.model, dit.lr, dit.weight_decay, dit.lr_schedule, dit.batch_size, dit.ema_decay) == (
        "dit-xl/2", 1e-4, 0.0, "constant", 256, 0.9999)
    tld = T.config_from_args(["preset=tld-256"])
    assert (tld.prediction, tld.schedule, tld.time_sampler, tld.lr, tld.batch_size, tld.ema_decay) == (
        "x0", "rectified", "beta", 3e-4, 256, 0.999)


def test_tensors_dataset_trains_text_conditioned_tld(tmp_path):
    """The tld-256 recipe's code path (latents-like tensors + pooled text) at toy size."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "toy.safetensors"
    save_file({"images": torch.randn(32, 4, 16, 16, generator=g), "text": torch.randn(32, 8, generator=g)},
              str(path))
    cfg = T.config_from_args(["preset=tld-256", "dataset=tensors", f"data_root={path}", f"out_dir={tmp_path / 'run'}",
                              "model=tld-course", "model.embed_dim=32", "model.depth=1", "model.head_dim=16",
                              "model.noise_embed_dim=16", "image_size=16", "batch_size=8", "max_steps=3",
                              "mixed_precision=no", "sample_steps=2", "sample_every=0", "save_every=0",
                              "log_every=1", "progress=false"])
    summary = T.train(cfg)
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "samples" / "step_0000003.png").exists()
    model = T.load_model(tmp_path / "run")
    assert model.text_dim == 8 and model.in_chans == 4


# --- each rank draws its own noise ------------------------------------------------------------

def test_rank_slices_tile_the_global_batch_as_the_sampler_does():
    """rank_slice(r, a) is the rows of step_randomness's global draw that rank r uses in micro-batch a.
    Over every (a, r) the slices tile the batch, and they are the rows of the examples StepBatchSampler
    gives that rank: so an example is noised with the same row whatever the process count."""
    one = list(T.StepBatchSampler(100, 16, 0, rank=0, world=1, accum=1, start_step=0, max_steps=3))
    for world, accum in ((1, 1), (2, 1), (2, 2), (4, 2)):
        rows = [list(range(16))[T.rank_slice(16, r, world, accum, a)] for a in range(accum) for r in range(world)]
        assert sum(rows, []) == list(range(16)), (world, accum, rows)
        per_rank = [list(T.StepBatchSampler(100, 16, 0, r, world, accum, 0, 3)) for r in range(world)]
        for step in range(3):
            for r in range(world):
                for a in range(accum):
                    assert per_rank[r][step * accum + a] == one[step][T.rank_slice(16, r, world, accum, a)]


# captures the (eps, t) that train_step hands to tld.diffusion.add_noise, then trains as `python -m tld.train`
NOISE_DRIVER = """
import os, sys
from safetensors.torch import save_file
import tld.diffusion as D
from tld import train as T

seen, real = [], D.add_noise
def add_noise(x0, eps, t, schedule):
    seen.append((eps.detach().cpu().clone(), t.detach().cpu().clone()))
    return real(x0, eps, t, schedule)
D.add_noise = add_noise
rc = T.main(sys.argv[1:])
tensors = {f"{k}_{i}": v for i, (e, t) in enumerate(seen) for k, v in (("eps", e), ("t", t))}
save_file(tensors, os.path.join(os.environ["TLD_NOISE_OUT"], f"rank{os.environ.get('RANK', '0')}.safetensors"))
sys.exit(rc)
"""


def captured(path, n):
    t = load_file(str(path))
    assert len(t) == 2 * n, f"{path.name}: {len(t) // 2} calls of add_noise, expected {n}"
    return [(t[f"eps_{i}"], t[f"t_{i}"]) for i in range(n)]


@pytest.mark.multiprocess
def test_each_rank_draws_its_own_rows_of_the_global_noise_inside_the_loop(tmp_path):
    """Two processes (accelerate, gloo) with grad_accum=2: the eps and t that train_step actually uses on
    rank r in micro-batch a are rows rank_slice(r, a) of step_randomness: the ranks' noise differs, and
    together it is exactly what one process uses."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    steps, accum = 2, 2
    args = ["preset=smoke", "progress=false", f"max_steps={steps}", f"grad_accum={accum}", "sample_steps=1"]
    (tmp_path / "driver.py").write_text(NOISE_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, launch in (("one", [sys.executable]),
                         ("two", [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                  "--mixed_precision", "no", "--dynamo_backend", "no"])):
        (tmp_path / name).mkdir()
        out = subprocess.run([*launch, str(tmp_path / "driver.py"), *args, f"out_dir={tmp_path / name}"],
                             capture_output=True, text=True, env={**env, "TLD_NOISE_OUT": str(tmp_path / name)},
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    one = captured(tmp_path / "one" / "rank0.safetensors", steps * accum)
    two = [captured(tmp_path / "two" / f"rank{r}.safetensors", steps * accum) for r in (0, 1)]
    cfg = T.config_from_args(args)
    for step in range(steps):
        t_all, eps_all, _ = T.step_randomness(cfg, step, (cfg.batch_size, 3, 16, 16), 18)
        for a in range(accum):
            i = step * accum + a
            for r in (0, 1):
                sl = T.rank_slice(cfg.batch_size, r, 2, accum, a)
                assert torch.equal(two[r][i][0], eps_all[sl]), f"rank {r}, step {step}, micro-batch {a}: eps"
                assert torch.equal(two[r][i][1], t_all[sl].to(two[r][i][1].dtype)), f"rank {r}: t"
            assert not torch.equal(two[0][i][0], two[1][i][0]), f"step {step}, micro-batch {a}: same noise"
            assert two[0][i][0].shape[0] == cfg.batch_size // (2 * accum)
        # one process's micro-batch a is ranks 0 and 1's micro-batch a, side by side
        for a in range(accum):
            i = step * accum + a
            torch.testing.assert_close(one[i][0], torch.cat([two[0][i][0], two[1][i][0]]), atol=0, rtol=0)
    assert not torch.equal(one[0][0], one[accum][0]), "two steps drew the same noise"


@pytest.mark.multiprocess
def test_torchrun_two_processes_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    args = ["preset=smoke", "progress=false", "max_steps=4", "log_every=2"]
    T.train(T.config_from_args(args + [f"out_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tld.train", *args, f"out_dir={tmp_path / 'two'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "two/summary.json").read_text())["num_processes"] == 2
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # the logged loss is the mean over both ranks' halves: equal to the 1-process loss
    assert log_losses(tmp_path / "two") == pytest.approx(log_losses(tmp_path / "one"), rel=1e-5)


# --- the train benchmark measures like with like -----------------------------------------------

def test_gradient_checkpointing_saves_over_half_the_activation_memory_of_a_uvit():
    from tld.bench import checkpointing_saving

    out = checkpointing_saving("uvit-course", batch=4)
    assert out["saving"] > 0.5, out


def test_bench_compares_dits_of_equal_work():
    from tld.bench import dit_pair, make_step, step_flops

    ours, theirs = dit_pair(size=8, width=64, depth=2, heads=2)
    flops = {}
    for who, model in (("tld", ours), ("diffusers", theirs)):
        _, loss_fn = make_step(model, who, 2, torch.device("cpu"))
        flops[who] = step_flops(loss_fn)
    assert flops["tld"] == pytest.approx(flops["diffusers"], rel=0.02), flops


def test_compiled_run_saves_checkpoints_with_plain_names(tmp_path, monkeypatch):
    """compile=true wraps the model; checkpoints and the EMA must still see the module's own names."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager"))
    T.train(smoke(tmp_path, "eager", "max_steps=3"))
    T.train(smoke(tmp_path, "compiled", "max_steps=3", "compile=true"))
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert T.load_model(tmp_path / "compiled") is not None
