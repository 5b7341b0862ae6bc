"""``python -m tld.models``: every preset with its parameter count and GMACs per forward pass.

Both are measured on the meta device (no memory, no time): parameters by summing numel, MACs
with ``torch.utils.flop_counter.FlopCounterMode`` over one forward of one image. The counter
reports FLOPs = 2 x multiply-accumulates for matmuls, attention and convolutions; the papers'
"Gflops" (DiT, U-DiT) are MACs, so we halve it (DiT-XL/2: 118.6 G at 256x256, as in DiT
Table 4). U-DiT is also listed merged, the form the U-DiT paper measures.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import PRESETS, count_parameters, create


def example_inputs(model: torch.nn.Module, batch: int = 1):
    """(x, t, cond) that fit a model, on the current default device."""
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size)
    t = torch.rand(batch)
    if getattr(model, "num_classes", 0):
        cond = torch.zeros(batch, dtype=torch.long)
    elif getattr(model, "text_len", None) and getattr(model, "text_dim", 0):  # U-ViT: text tokens
        cond = torch.zeros(batch, model.text_len, model.text_dim)
    elif getattr(model, "text_dim", 0):  # TLD: pooled text
        cond = torch.zeros(batch, model.text_dim)
    else:
        cond = None
    return x, t, cond


def count_macs(model: torch.nn.Module, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (FlopCounterMode's FLOPs / 2)."""
    device = next(model.parameters()).device
    with torch.device(device):
        x, t, cond = example_inputs(model, batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, cond)
    return counter.get_total_flops() // 2


def measure(name: str, merged: bool = False) -> tuple[int, int]:
    """(parameters, MACs per forward of one image) of a preset, built on the meta device."""
    with torch.device("meta"):
        model = create(name)
        if merged:
            model = model.merged()
        return count_parameters(model), count_macs(model)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv else None) or sorted(PRESETS)
    print(f"{'preset':<22} {'parameters':>15} {'GMACs':>9}  description")
    for name in names:
        params, macs = measure(name)
        print(f"{name:<22} {params:>15,} {macs / 1e9:>9.2f}  {PRESETS[name].doc}")
        if name.startswith("udit"):
            params, macs = measure(name, merged=True)
            print(f"{name + ' (merged)':<22} {params:>15,} {macs / 1e9:>9.2f}  .merged(): the inference form")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
