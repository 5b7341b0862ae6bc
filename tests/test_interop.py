"""tld.interop.load_diffusers_dit on a tiny random diffusers DiT built from a config (no download)."""

import pytest
import torch

from tld.interop import load_diffusers_dit

diffusers = pytest.importorskip("diffusers")


def tiny_diffusers_dit(seed=0, learned_sigma=True):
    torch.manual_seed(seed)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                         out_channels=8 if learned_sigma else 4, num_layers=2, sample_size=8,
                                         patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in tr.parameters():  # random everywhere, so no zero-init hides a mapping mistake
            p.normal_(0, 0.2)
        # the official weights hold one embedder copied into every block; do the same
        shared = tr.transformer_blocks[0].norm1.emb.state_dict()
        for blk in tr.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(shared)
    return tr


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_tld_dit_matches_diffusers_dit_with_timestep_over_1000(learned_sigma):
    tr = tiny_diffusers_dit(learned_sigma=learned_sigma)
    model = load_diffusers_dit(tr)
    x = torch.randn(3, 4, 8, 8)
    timestep = torch.tensor([0, 517, 999])
    y = torch.tensor([1, 9, 10])  # 10 is the null class
    with torch.no_grad():
        want = tr(x, timestep=timestep, class_labels=y).sample
        got = model(x, timestep / 1000, y)
    assert want.shape == (3, 8 if learned_sigma else 4, 8, 8)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_load_diffusers_dit_from_a_saved_folder(tmp_path):
    tr = tiny_diffusers_dit(seed=1)
    tr.save_pretrained(tmp_path / "transformer")
    model = load_diffusers_dit(tmp_path)  # a pipeline-style folder with transformer/
    x, ts, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, ts / 1000, y), tr(x, timestep=ts, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)


def test_load_diffusers_dit_refuses_untied_embedders_and_missing_folders(tmp_path):
    tr = tiny_diffusers_dit()
    with torch.no_grad():
        tr.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    with pytest.raises(ValueError, match="embedder differs"):
        load_diffusers_dit(tr)
    with pytest.raises(FileNotFoundError, match="no DiT folder"):
        load_diffusers_dit(tmp_path / "missing")
