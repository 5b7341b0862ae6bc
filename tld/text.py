"""Text encoders behind one interface (lesson 09).

    pooled, tokens, mask = encoder.encode(["a red circle at the top left"])
    # pooled [B, D]: one vector per prompt (TLD's cross-attention token, DiT's adaLN input)
    # tokens [B, L, D_tok]: one vector per token (U-ViT's extra tokens, cross-attention keys)
    # mask   [B, L] bool: True on real tokens, False on padding

Two encoders share it:

* ``CLIPText(name)``: a pretrained CLIP text tower through transformers (TLD uses
  ``openai/clip-vit-large-patch14``, pooled 768-d). Loaded only when asked for, only from disk,
  and checked: offline, ``CLIPTokenizer.from_pretrained(<hub id>)`` can hand back a broken
  2-token vocabulary without raising, so we count the vocabulary and the weights we got.
* ``TinyCLIP``: a small text + image CLIP trained here on the shapes captions with the
  contrastive loss (Radford et al. 2021, Fig. 3) and a BPE tokenizer trained on the same
  captions with Hugging Face ``tokenizers``: the offline path, ready in well under a minute.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .data import ShapesDataset
from .optim import fit_one_cycle

__all__ = ["train_bpe_tokenizer", "TinyCLIP", "clip_loss", "train_tiny_clip", "retrieval_accuracy",
           "CLIPText", "load_text_encoder", "null_embedding", "shapes_captions"]

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


# --------------------------------------------------------------------------- tokenizer

def shapes_captions(seed: int = 0, n: int = 2000) -> list[str]:
    """Captions of the first n shapes images of `seed` (the tokenizer's training text)."""
    return ShapesDataset(size=8, seed=seed, length=n).batch(range(n))["caption"]


def train_bpe_tokenizer(texts, vocab_size: int = 128, context_length: int = 16):
    """A byte-pair-encoding tokenizer (Sennrich et al. 2016) learned from `texts`.

    Every prompt becomes [BOS] tokens... [EOS] padded with [PAD] to `context_length`, like CLIP's
    77-token window. Words never seen still tokenize (into smaller pieces, [UNK] only for a
    character outside the alphabet), as BPE promises.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # "</w>" marks a word's last piece (as CLIP's tokenizer does), so decoding restores the spaces
    tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # every lowercase letter and digit in the alphabet, so no prompt ever needs an unknown token
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok = _canonical_ids(tok)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    tok.enable_padding(pad_id=tok.token_to_id(PAD), pad_token=PAD, length=context_length)
    tok.enable_truncation(max_length=context_length)
    return tok


def _canonical_ids(tok):
    """The same tokenizer with ids in a fixed order: special tokens, single pieces sorted, then merges.

    The `tokenizers` trainer numbers the single characters in hash-map order, which changes from one
    process to the next: the same captions gave different ids, hence a different TinyCLIP, every run.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    specials = sorted((t for t in vocab if t in (PAD, BOS, EOS, UNK)), key=vocab.get)  # the trainer's 0..3
    merged = list(dict.fromkeys(a + b for a, b in pairs))
    singles = sorted(t for t in vocab if t not in specials and t not in set(merged))
    order = specials + singles + [t for t in merged if t in vocab]
    if len(order) != len(vocab):
        raise RuntimeError(f"BPE vocabulary of {len(vocab)} tokens did not reorder cleanly ({len(order)})")
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in spec.get("added_tokens", []):
        added["id"] = spec["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


# --------------------------------------------------------------------------- shared helpers

def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


def null_embedding(encoder, batch: int = 1, kind: str = "empty") -> torch.Tensor:
    """The 'no prompt' pooled vector for classifier-free guidance [batch, D].

    ``empty``: the encoding of "" (U-ViT, Stable Diffusion); ``zero``: the zero vector (TLD's
    dropout, and what a tld denoiser reads when cond is None).
    """
    if kind == "empty":
        return encoder.encode([""])[0].expand(batch, -1)
    if kind == "zero":
        return torch.zeros(batch, encoder.dim, device=encoder.device)
    raise ValueError(f"unknown null embedding kind {kind!r}; expected 'empty' or 'zero'")


# --------------------------------------------------------------------------- TinyCLIP

class TinyCLIP(nn.Module):
    """A small CLIP for the shapes world: a transformer over BPE tokens and a CNN over images.

    ``encode(prompts)`` gives the text side; ``encode_images(images in [-1, 1])`` the image side;
    both are unit vectors of width ``dim`` in a shared space.
    """

    def __init__(self, tokenizer, dim: int = 64, width: int = 64, depth: int = 2, heads: int = 4,
                 image_size: int = 32, image_width: int = 32):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"TinyCLIP image_size {image_size} must be a multiple of 8 (three stride-2 convs)")
        self.tokenizer = tokenizer
        self.context_length = tokenizer.padding["length"]
        self.config = dict(dim=dim, width=width, depth=depth, heads=heads, image_size=image_size,
                           image_width=image_width)
        self.dim, self.width, self.image_size = dim, width, image_size
        vocab = tokenizer.get_vocab_size()
        self.token_embed = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, self.context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.text_blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(width)
        self.text_proj = nn.Linear(width, dim, bias=False)
        w = image_width
        # flattened, not pooled: the image embedding must know *where* the shape is
        self.image_net = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(2 * w * (image_size // 8) ** 2, dim))
        # learned temperature, initialised at 1/0.07 as CLIP does (Radford et al. 2021, Sec. 2.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] and mask [B, L] (True on real tokens)."""
        enc = self.tokenizer.encode_batch(_check_prompts(prompts))
        ids = torch.tensor([e.ids for e in enc], device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], device=self.device).bool()
        return ids, mask

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor):
        h = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        h = self.text_norm(self.text_blocks(h, src_key_padding_mask=~mask))
        # pooled = the [EOS] token's state, as in CLIP: the last real token of each prompt
        last = mask.long().sum(1) - 1
        pooled = F.normalize(self.text_proj(h[torch.arange(len(ids), device=ids.device), last]), dim=-1)
        return pooled, h * mask[..., None], mask

    def encode(self, prompts):
        """(pooled [B, dim] unit vectors, tokens [B, L, width], mask [B, L])."""
        return self.encode_tokens(*self.tokenize(prompts))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"TinyCLIP expects images [B, 3, {self.image_size}, {self.image_size}] in [-1, 1], "
                             f"got {tuple(images.shape)}")
        return F.normalize(self.image_net(images.to(self.device)), dim=-1)

    def similarity(self, prompts, images) -> torch.Tensor:
        """Cosine similarity [n_prompts, n_images]."""
        return self.encode(prompts)[0] @ self.encode_images(images).T

    # -- saving and loading: config.json + model.safetensors + tokenizer.json, one atomic folder (tld.io)
    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        with io.atomic_folder(folder) as tmp:
            io.save_tensors(tmp / "model.safetensors", self.state_dict())
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            io.write_json(tmp / "config.json", {"type": "TinyCLIP", **self.config})
        return folder

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> TinyCLIP:
        from tokenizers import Tokenizer

        folder = io.recover(Path(folder))
        missing = [f for f in ("config.json", "tokenizer.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r} is not a saved TinyCLIP: missing {', '.join(missing)}")
        config = io.read_json(folder / "config.json")
        if config.pop("type", None) != "TinyCLIP":
            raise ValueError(f"{folder / 'config.json'} does not describe a TinyCLIP")
        model = cls(Tokenizer.from_file(str(folder / "tokenizer.json")), **config)
        io.load_exact(model, io.load_tensors(folder / "model.safetensors"), folder / "model.safetensors", "TinyCLIP")
        return model.to(device).eval()


def clip_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, same=None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the [B, B] similarity matrix (Radford et al. 2021, Fig. 3).

    `same` [B, B] bool marks pairs with the same caption: with 162 distinct shapes captions a batch
    repeats some, and those are not negatives, so the target spreads evenly over them.
    """
    logits = logit_scale.exp().clamp(max=100) * text @ image.T
    target = torch.eye(len(text), device=text.device) if same is None else same.float()
    target = target / target.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2


def train_tiny_clip(steps: int = 300, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                    image_size: int = 32, progress: bool = False, **config) -> TinyCLIP:
    """Train a TinyCLIP on fresh shapes renders (seeds 20_000 + seed..., never the held-out ones)."""
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(shapes_captions(seed=20_000 + seed))
    model = TinyCLIP(tokenizer, image_size=image_size, **config)
    ds = ShapesDataset(size=image_size, seed=20_000 + seed, length=10_000_000)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step):
        b = ds.batch(torch.randint(len(ds), (batch_size,), generator=gen).tolist())
        same = b["label"][:, None] * 9 + b["position"][:, None] == (b["label"] * 9 + b["position"])[None]
        pooled = model.encode(b["caption"])[0]
        return clip_loss(pooled, model.encode_images(b["image"]), model.logit_scale, same)

    return fit_one_cycle(model, loss_at, steps, lr, weight_decay=0.01, progress=progress, digits=3)


@torch.no_grad()
def retrieval_accuracy(model: TinyCLIP, n: int = 256, seed: int = 1, batch: int = 64) -> float:
    """Held-out caption -> image retrieval: among `batch` images, does each caption pick its own?

    A pick counts as right when the chosen image has the query's caption (a batch may hold the
    same caption twice). Images come from `seed`, unseen in training; chance is about 1/batch.
    """
    ds = ShapesDataset(size=model.image_size, seed=seed, length=n)
    right = 0
    for start in range(0, n, batch):
        b = ds.batch(range(start, min(n, start + batch)))
        pick = model.similarity(b["caption"], b["image"]).argmax(1).tolist()
        right += sum(b["caption"][j] == c for j, c in zip(pick, b["caption"]))
    return right / n


# --------------------------------------------------------------------------- pretrained CLIP

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class CLIPText(nn.Module):
    """A pretrained CLIP text tower via transformers, read from disk only and checked.

    `name`: a local folder, or a hub id already in the local cache (never downloaded unless
    `local_files_only=False`). `projection=True` gives CLIP's projected text embedding as pooled
    (TLD's 768-d for ViT-L/14); False gives the pooler output. tokens are the last hidden states.
    """

    def __init__(self, name: str, device="cpu", projection: bool = True, max_length: int = 77,
                 min_vocab: int = 1000, local_files_only: bool = True):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.name, self.max_length, self.projection = str(name), max_length, projection
        if os.path.isdir(name):
            missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(name, f))]
            if not any(os.path.isfile(os.path.join(name, w)) for w in _WEIGHTS):
                missing.append(" or ".join(_WEIGHTS))
            if not (os.path.isfile(os.path.join(name, "vocab.json")) and os.path.isfile(os.path.join(name, "merges.txt"))):
                missing.append("vocab.json + merges.txt (the tokenizer)")
            if missing:
                raise FileNotFoundError(f"CLIP folder {name!r} lacks {', '.join(missing)}")
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)
            self.model, info = cls.from_pretrained(name, local_files_only=local_files_only, output_loading_info=True)
        except OSError as e:
            raise FileNotFoundError(
                f"CLIP {name!r} is not on disk ({e.__class__.__name__}); download it once with "
                f"`huggingface-cli download {name}` or pass a local folder") from e
        # offline, a hub id can give a 2-token vocabulary without any error: count it
        if len(self.tokenizer) < min_vocab:
            raise ValueError(f"the CLIP tokenizer loaded from {name!r} has {len(self.tokenizer)} tokens, "
                             f"expected > {min_vocab}: its vocab.json / merges.txt are missing or broken (offline, a hub id "
                             "that is not in the local cache loads like this without an error)")
        if info["missing_keys"]:
            raise ValueError(f"CLIP weights from {name!r} lack {info['missing_keys'][:5]} "
                             f"({len(info['missing_keys'])} missing); is this a CLIP text model?")
        self.model.to(device).eval().requires_grad_(False)
        self.dim = self.model.config.projection_dim if projection else self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts):
        enc = self.tokenizer(_check_prompts(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").to(self.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        pooled = out.text_embeds if self.projection else out.pooler_output
        return pooled, out.last_hidden_state, enc["attention_mask"].bool()

    def save_pretrained(self, folder) -> Path:
        """A pointer, not the weights: {'type': 'CLIPText', 'name': ...} (the weights stay where they are)."""
        folder = Path(folder)
        with io.atomic_folder(folder) as tmp:
            io.write_json(tmp / "config.json", {"type": "CLIPText", "name": self.name, "projection": self.projection,
                                                "max_length": self.max_length})
        return folder


def load_text_encoder(folder, device="cpu"):
    """Whatever `save_pretrained` wrote into `folder`: a TinyCLIP, or a pointer to a CLIPText."""
    config_file = io.recover(Path(folder)) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no text encoder in {str(folder)!r}: config.json is missing")
    config = io.read_json(config_file)
    if config.get("type") == "TinyCLIP":
        return TinyCLIP.from_pretrained(folder, device)
    if config.get("type") == "CLIPText":
        return CLIPText(config["name"], device, config["projection"], config["max_length"])
    raise ValueError(f"{config_file} has type {config.get('type')!r}; expected 'TinyCLIP' or 'CLIPText'")
