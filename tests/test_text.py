"""Claims of tld.text: a BPE tokenizer learned from captions, a TinyCLIP that retrieves held-out
images from their captions, and a pretrained-CLIP loader that checks what it loaded.

The pretrained path is tested on a tiny CLIPTextModelWithProjection and a CLIP tokenizer built
here from a config and a generated vocabulary: the real loading code, never a download.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from tld.data import ShapesDataset
from tld.text import (
    CLIPText,
    TinyCLIP,
    clip_loss,
    load_text_encoder,
    null_embedding,
    retrieval_accuracy,
    shapes_captions,
    train_bpe_tokenizer,
    train_tiny_clip,
)


@pytest.fixture(scope="session")
def tiny_clip():
    # a few seconds of training: small widths, 120 steps of 64 pairs
    return train_tiny_clip(steps=120, batch_size=64, lr=3e-3, dim=32, width=32, depth=1, image_width=16)


def make_clip_text_folder(folder, vocab_letters="abcdefghijklmnopqrstuvwxyz", projection_dim=16):
    """A tiny CLIP text model + a CLIP tokenizer (byte alphabet + letter-pair merges) saved to `folder`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = [f"{a} {b}" for a in vocab_letters for b in vocab_letters]
    vocab += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- tokenizer

def test_bpe_tokenizer_round_trips_captions_and_pads_to_the_context_length():
    tok = train_bpe_tokenizer(shapes_captions(n=500), vocab_size=128, context_length=16)
    enc = tok.encode("a magenta triangle at the bottom right")
    assert len(enc.ids) == 16 and enc.tokens[:2] == ["[BOS]", "a</w>"]
    assert sum(enc.attention_mask) == len(enc.tokens) - enc.tokens.count("[PAD]")
    assert tok.decode(enc.ids) == "a magenta triangle at the bottom right"
    # a word never seen in training still tokenizes, into smaller known pieces
    unseen = tok.encode("a purple hexagon")
    assert tok.decode(unseen.ids) == "a purple hexagon" and "[UNK]" not in unseen.tokens


# --------------------------------------------------------------------------- the contrastive loss

def test_clip_loss_is_near_zero_for_matched_pairs_and_log_batch_for_uninformative_ones():
    b = 8
    e = torch.eye(b)
    scale = torch.tensor(4.6)   # exp = 100, CLIP's clamp
    assert clip_loss(e, e, scale).item() < 1e-3
    same = torch.ones(b, 1)
    torch.testing.assert_close(clip_loss(same, same, scale), torch.tensor(b).log(), rtol=1e-5, atol=1e-5)


def test_clip_loss_spreads_the_target_over_duplicate_captions_by_the_exact_amount():
    """With `same`, row i's target is uniform over its caption group G(i) instead of one-hot. Each
    cross-entropy is -sum_j q_ij l_ij + logsumexp_j l_ij, and the logsumexp does not depend on the
    target, so in both directions (same is symmetric, every row of a group has |G| members)

        loss(same) - loss(eye) = (1/B) sum_i (l_ii - mean_{j in G(i)} l_ij),   l = scale * text @ image.T

    positive when each image matches its own copy of the caption better than the other copies
    (the one-hot target rewards telling duplicates apart; the spread one does not), negative when
    crossed, and exactly 0 when duplicates encode to one vector (a deterministic text encoder)."""
    captions = ["red", "red", "blue", "green", "green", "green"]   # a batch with two duplicate groups
    b = len(captions)
    same = torch.tensor([[a == c for c in captions] for a in captions])
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=-1)
    image = F.normalize(text + 0.3 * torch.randn(b, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(2.0, dtype=torch.float64)

    def predicted_gap(t, im):
        logits = scale.exp() * t @ im.T
        group_mean = (same * logits).sum(1) / same.sum(1)
        return (logits.diagonal() - group_mean).mean()

    gap = clip_loss(text, image, scale, same=same) - clip_loss(text, image, scale)
    torch.testing.assert_close(gap, predicted_gap(text, image), rtol=1e-6, atol=1e-6)   # the target is float32
    assert gap > 0.5, gap   # each image is nearest its own copy: 2.54 here, against 0 if `same` were ignored
    # swap the images inside the pair of "red" captions: each now matches the other copy better
    crossed = image[[1, 0, 2, 3, 4, 5]]
    gap_crossed = clip_loss(text, crossed, scale, same=same) - clip_loss(text, crossed, scale)
    torch.testing.assert_close(gap_crossed, predicted_gap(text, crossed), rtol=1e-6, atol=1e-6)
    assert gap_crossed < gap
    # duplicates that encode to one vector: the spread target changes neither the loss nor the gradient
    # that reaches the shared embedding (per copy the gradients differ; their sum does not)
    base = text.clone().requires_grad_(True)
    tied = base[[0, 0, 2, 3, 3, 3]]
    losses = [clip_loss(tied, image, scale, same=s) for s in (same, None)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(loss, base, retain_graph=True)[0] for loss in losses]   # the indexing is shared
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- TinyCLIP

def test_tiny_clip_encode_gives_unit_pooled_tokens_and_mask(tiny_clip):
    prompts = ["a red circle at the top left", "a cyan square in the center", ""]
    pooled, tokens, mask = tiny_clip.encode(prompts)
    L = tiny_clip.context_length
    assert pooled.shape == (3, 32) and tokens.shape == (3, L, 32) and mask.shape == (3, L)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    assert mask.dtype == torch.bool and mask[2].sum() == 2   # "" is [BOS] [EOS]
    assert (tokens[~mask] == 0).all()
    # padding does not leak: a prompt encodes the same alone and in a batch
    torch.testing.assert_close(tiny_clip.encode(prompts[:1])[0], pooled[:1], atol=1e-5, rtol=1e-5)


def test_tiny_clip_retrieves_held_out_images_from_their_captions(tiny_clip):
    acc = retrieval_accuracy(tiny_clip, n=256, seed=1, batch=64)   # chance is about 1/64
    assert acc > 0.5, f"held-out caption->image retrieval {acc:.3f}"


def test_tiny_clip_prefers_the_true_caption_over_a_wrong_color(tiny_clip):
    b = ShapesDataset(size=32, seed=2, length=64).batch(range(64))
    wrong = [c.replace(" red ", " blue ") if " red " in c else c.replace(c.split()[1], "red") for c in b["caption"]]
    s_true = (tiny_clip.encode(b["caption"])[0] * tiny_clip.encode_images(b["image"])).sum(-1)
    s_wrong = (tiny_clip.encode(wrong)[0] * tiny_clip.encode_images(b["image"])).sum(-1)
    assert (s_true > s_wrong).float().mean() > 0.8


def test_tiny_clip_save_and_load_round_trip(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    assert {p.name for p in (tmp_path / "clip").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    loaded = load_text_encoder(tmp_path / "clip")
    assert isinstance(loaded, TinyCLIP)
    prompts = ["a green triangle on the left"]
    for a, b in zip(tiny_clip.encode(prompts), loaded.encode(prompts)):
        torch.testing.assert_close(a, b)
    (tmp_path / "clip" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TinyCLIP.from_pretrained(tmp_path / "clip")


def test_null_embedding_is_the_empty_prompt_or_zero(tiny_clip):
    empty = null_embedding(tiny_clip, 3, "empty")
    assert empty.shape == (3, 32)
    torch.testing.assert_close(empty[1], tiny_clip.encode([""])[0][0])
    assert (null_embedding(tiny_clip, 2, "zero") == 0).all()
    with pytest.raises(ValueError, match="null embedding kind"):
        null_embedding(tiny_clip, 1, "nothing")


def test_tiny_clip_rejects_wrong_image_size(tiny_clip):
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        tiny_clip.encode_images(torch.zeros(2, 3, 16, 16))


# --------------------------------------------------------------------------- pretrained CLIP

def test_clip_text_loads_a_local_model_and_matches_transformers(tmp_path):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = make_clip_text_folder(tmp_path / "clip")
    enc = CLIPText(str(folder))
    pooled, tokens, mask = enc.encode(["a red circle", "a blue square at the top"])
    assert enc.dim == 16 and pooled.shape == (2, 16) and tokens.shape == (2, 77, 32) and mask.shape == (2, 77)
    ids = CLIPTokenizer.from_pretrained(folder)(["a red circle"], padding="max_length", max_length=77,
                                                return_tensors="pt")
    ref = CLIPTextModelWithProjection.from_pretrained(folder)(**ids).text_embeds
    torch.testing.assert_close(pooled[:1], ref)
    # the pipeline saves a pointer to the weights, and loads it back
    enc.save_pretrained(tmp_path / "pointer")
    torch.testing.assert_close(load_text_encoder(tmp_path / "pointer").encode(["a red circle"])[0], pooled[:1])


def test_clip_text_refuses_a_tokenizer_with_a_tiny_vocabulary(tmp_path):
    folder = make_clip_text_folder(tmp_path / "clip", vocab_letters="ab")   # 518 tokens, no error from HF
    with pytest.raises(ValueError, match="518 tokens"):
        CLIPText(str(folder))


def test_clip_text_names_missing_files(tmp_path):
    folder = make_clip_text_folder(tmp_path / "clip")
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPText(str(folder))


def test_clip_text_hub_id_not_on_disk_raises_instead_of_a_broken_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-clip"):
        CLIPText("tld-course/no-such-clip")


def test_bpe_tokenizer_is_the_same_in_every_process():
    """The trainer numbers pieces in hash-map order; ours fixes the ids, so runs are reproducible."""
    import subprocess
    import sys

    code = ("from tld.text import train_bpe_tokenizer, shapes_captions; "
            "print(train_bpe_tokenizer(shapes_captions(n=500)).to_str())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(outs) == 1, "the tokenizer differs between processes"
