"""Checks that need a CUDA GPU; every one is skipped on a machine without one.

    pytest -q tests/test_gpu.py          # on a GPU machine (see README, "GPU checks")

Mixed precision, each SDPA kernel, xformers, torch.compile and gradient checkpointing must change
no result beyond the tolerance of the number format they use.
"""

import json

import pytest
import torch

from tld import bench
from tld import train as T
from tld.blocks import attention, xformers_available
from tld.models import create

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def smoke(tmp_path, name, *args):
    return T.config_from_args(["preset=smoke", f"out_dir={tmp_path / name}", "progress=false", "log_every=1",
                               "sample_every=0", *args])


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "log.jsonl").read_text().splitlines()]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


# --- the trainer on a GPU -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    summary = T.train(smoke(tmp, "run", "max_steps=20"))
    return tmp / "run", summary


def test_trainer_runs_on_the_gpu_and_matches_the_cpu_loss(fp32_run, tmp_path):
    run_dir, _ = fp32_run
    state = torch.load(run_dir / "checkpoints" / "step_0000020" / "optimizer.pt", weights_only=True)
    moments = state["optimizer"]["state"][0]["exp_avg"]
    assert moments.is_cuda, "the optimizer state was not on the GPU: the trainer did not use it"
    # the same 20 steps on the CPU: identical data, noise and timesteps, so the loss curves agree to
    # the rounding of different kernels (and fused vs for-loop AdamW)
    import subprocess
    import sys
    code = ("import sys; from tld import train as T; T.train(T.config_from_args(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, "preset=smoke", f"out_dir={tmp_path / 'cpu'}", "progress=false",
                    "log_every=1", "sample_every=0", "max_steps=20"], check=True,
                   env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "cpu"), rel=5e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_to_nearly_the_fp32_loss(fp32_run, tmp_path, precision):
    run_dir, _ = fp32_run
    T.train(smoke(tmp_path, precision, "max_steps=20", f"mixed_precision={precision}"))
    la, lb = losses(run_dir), losses(tmp_path / precision)
    assert len(lb) == 20 and all(torch.isfinite(torch.tensor(lb)))
    # bf16 keeps 8 bits of mantissa, fp16 11: each step's loss agrees to a few percent
    assert lb == pytest.approx(la, rel=0.05)


def test_compiled_training_matches_eager(fp32_run, tmp_path):
    run_dir, _ = fp32_run
    T.train(smoke(tmp_path, "compiled", "max_steps=20", "compile=true"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(run_dir), rel=1e-3)
    # checkpoints of a compiled run carry the plain names (no _orig_mod. prefix) and load as usual
    model = T.load_model(tmp_path / "compiled")
    assert model is not None


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
def test_xformers_backend_trains_to_the_sdpa_loss(fp32_run, tmp_path):
    run_dir, _ = fp32_run
    T.train(smoke(tmp_path, "xformers", "max_steps=20", "attn_backend=xformers"))
    assert losses(tmp_path / "xformers") == pytest.approx(losses(run_dir), rel=1e-3)


# --- attention kernels ----------------------------------------------------------------------

def _qkv(dtype, b=4, h=6, n=256, d=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
def test_each_sdpa_kernel_agrees_with_fp32_math(kernel, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(dtype)
    ref = attention(q.float(), k.float(), v.float(), "math")
    try:
        with sdpa_kernel(getattr(SDPBackend, kernel)):  # only this kernel: it runs, or SDPA raises
            out = attention(q, k, v, "sdpa")
    except RuntimeError as e:
        pytest.skip(f"{kernel} is not available for {dtype} here: {str(e)[:120]}")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_agrees_with_fp32_math_in_half_precision(dtype):
    q, k, v = _qkv(dtype)
    ref = attention(q.float(), k.float(), v.float(), "math")
    assert rel_err(attention(q, k, v, "xformers"), ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_models_give_the_same_output_on_gpu_as_on_cpu(monkeypatch):
    # cuDNN convolutions run on TF32 by default (U-DiT's downsampler and ConvMlp): 7e-4 apart. Full fp32 here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    for name in ("uvit-tiny", "dit-course", "udit-course", "tld-course"):
        model = create(name).eval()
        for p in model.parameters():  # DiT's zero-initialised head would make both outputs zero
            p.data.add_(0.02 * torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, model.in_chans, model.img_size, model.img_size, generator=g)
        t = torch.rand(2, generator=g)
        cond = (torch.randn(2, model.text_dim, generator=g) if getattr(model, "text_dim", 0)
                else torch.randint(0, max(model.num_classes, 1), (2,), generator=g) if model.num_classes else None)
        with torch.no_grad():
            ref = model(x, t, cond)
            out = model.cuda()(x.cuda(), t.cuda(), cond.cuda() if cond is not None else None).cpu()
        assert rel_err(out, ref) < 1e-4, name


# --- memory ---------------------------------------------------------------------------------

def test_gradient_checkpointing_halves_activation_memory_on_the_gpu():
    saving = bench.checkpointing_saving("uvit-course", batch=64, device=torch.device("cuda"))
    assert saving["saving"] >= 0.5, saving
    # and the allocator agrees: the peak over one forward+backward falls
    model = create("uvit-course").cuda().train()
    x = torch.randn(64, 3, model.img_size, model.img_size, device="cuda")
    t = torch.rand(64, device="cuda")
    y = torch.randint(0, model.num_classes, (64,), device="cuda")
    peaks = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(x, t, y).pow(2).mean().backward()
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    assert peaks[True] < 0.6 * peaks[False], peaks
