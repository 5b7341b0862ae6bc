"""Checkers of lesson 09, CLIP text conditioning: the CLIP loss, retrieval accuracy, [EOS] pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...text import TinyCLIP, clip_loss, retrieval_accuracy, shapes_captions, train_bpe_tokenizer
from .common import CheckError, _call, _close, _compare, _fail, _gen, _ok, _scalar, checker


@checker("clip_loss")
def check_clip_loss(fn) -> None:
    """``fn(text, image, logit_scale) -> loss``: CLIP's symmetric cross-entropy over the [B, B] similarities."""
    g = _gen(14)
    cases = [(6, 8, 2.0), (4, 16, math.log(1 / 0.07)), (5, 8, 5.0), (1, 4, 2.0)]  # 5.0: e^5 = 148, clamped to 100
    worst = 0.0
    for b, d, log_scale in cases:
        text = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        image = F.normalize(text + torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
        scale = torch.tensor(log_scale, dtype=torch.float64)
        case = f"text and image unit vectors {(b, d)}, logit_scale {log_scale:.4f} (temperature e^logit_scale)"

        def hint(got, exp, text=text, image=image, scale=scale):
            sim, labels = text @ image.T, torch.arange(len(text))
            logits = scale.exp().clamp(max=100) * sim
            if _close(got, F.cross_entropy(logits, labels), 1e-9) or _close(got, F.cross_entropy(logits.T, labels), 1e-9):
                return "CLIP's loss is symmetric: average the text->image and the image->text cross-entropies"
            both = (lambda lg: (F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels)) / 2)
            if _close(got, both(scale * sim), 1e-9):
                return "logit_scale is a log: multiply the similarities by logit_scale.exp()"
            if _close(got, both(scale.exp() * sim), 1e-9):
                return "clamp the temperature at 100 as CLIP does: logit_scale.exp().clamp(max=100)"
            if _close(got, both(sim), 1e-9):
                return "scale the cosine similarities by the temperature logit_scale.exp() before the softmax"
            return ("the logits are the [B, B] cosine similarities times the clamped temperature; row i's right "
                    "answer is column i, and the loss averages both directions",
                    "F.cross_entropy with targets torch.arange(B), once on the logits and once on their transpose")

        got = _call("clip_loss", fn, case, text, image, scale)
        worst = max(worst, _compare("clip_loss", got, clip_loss(text, image, scale), case, atol=1e-9, rtol=1e-9,
                                    hint=hint))
    _ok("clip_loss", len(cases), "tld.text.clip_loss", worst)


class _ToyCLIP:
    """A stand-in for TinyCLIP in tld.text.retrieval_accuracy: it knows each image's caption, plus noise.

    With ``prefer_copy`` a caption scores highest the *last* image that shares it, so a batch with a
    repeated caption retrieves the other copy (a right answer that is not on the diagonal).
    """

    image_size = 16

    def __init__(self, noise: float, seed: int, prefer_copy: bool = False):
        self.noise, self.gen, self.prefer_copy, self.seen = noise, _gen(seed), prefer_copy, None

    def similarity(self, prompts, images):
        n = len(prompts)
        same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float64)
        sim = same + (1e-3 * torch.arange(n, dtype=torch.float64)[None] if self.prefer_copy else 0)
        sim = sim + self.noise * torch.randn(n, n, generator=self.gen, dtype=torch.float64)
        self.seen = (sim, list(prompts))
        return sim


@checker("retrieval_accuracy")
def check_retrieval_accuracy(fn) -> None:
    """``fn(sim, captions) -> float``: caption -> image retrieval accuracy from a [n, n] similarity matrix.

    Row i is caption i, column j is image j (whose caption is captions[j]); a pick counts as right when
    the picked image has the query's caption, as in ``tld.text.retrieval_accuracy``.
    """
    cases = [(0.0, True, 64, 1), (0.6, False, 40, 2), (3.0, False, 25, 3)]
    worst = 0.0
    for noise, prefer_copy, n, seed in cases:
        toy = _ToyCLIP(noise, 100 + seed, prefer_copy)
        expected = torch.tensor(retrieval_accuracy(toy, n=n, seed=seed, batch=n), dtype=torch.float64)
        sim, captions = toy.seen
        repeats = n - len(set(captions))
        case = (f"sim {(n, n)} from {n} shapes images (dataset seed {seed}, {repeats} repeated captions), "
                f"noise {noise}" + (", each caption scoring its last copy highest" if prefer_copy else ""))

        def hint(got, exp, sim=sim, captions=captions, n=n):
            pick = sim.argmax(1)
            if _close(got, (pick == torch.arange(n)).double().mean(), 1e-9):
                return ("a batch can show the same caption twice: a pick is right when captions[pick] == captions[i], "
                        "whichever copy it picked")
            if _close(got, exp * n, 1e-9):
                return f"return the fraction of right picks (divide by the {n} captions), not the count"
            right = [captions[j] == captions[i] for i, j in enumerate(sim.argmax(0).tolist())]
            if _close(got, torch.tensor(sum(right) / n, dtype=torch.float64), 1e-9):
                return "each row is a caption: pick the best image with sim.argmax(dim=1)"
            return ("each caption (row) picks its most similar image; a pick is right when that image's caption is "
                    "the query's; the accuracy is the fraction of right picks",
                    "argmax over the images axis, compare caption strings, average the booleans as floats")

        got = _scalar("retrieval_accuracy", _call("retrieval_accuracy", fn, case, sim.clone(), list(captions)), case)
        worst = max(worst, _compare("retrieval_accuracy", got, expected, case, atol=1e-9, rtol=0, hint=hint))
    _ok("retrieval_accuracy", len(cases), "tld.text.retrieval_accuracy", worst)


@checker("eos_pool")
def check_eos_pool(fn) -> None:
    """``fn(tokens, mask) -> [B, width]``: the state of each prompt's last real token ([EOS]), CLIP's pooling."""
    tokenizer = train_bpe_tokenizer(shapes_captions(seed=0, n=300), vocab_size=128, context_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(15)
        clip = TinyCLIP(tokenizer, dim=16, width=24, depth=1, heads=2, image_size=8, image_width=4).eval()
    long = "a red circle at the top left and a blue square in the center and a green triangle"
    cases = [["a red circle at the top left", "", "a cyan square"],
             ["a yellow triangle on the right", "square", "a magenta circle at the bottom right", "a blue square"],
             [long, "a green circle"]]
    worst = 0.0
    for prompts in cases:
        with torch.no_grad():
            pooled, tokens, mask = clip.encode(prompts)
        n_real = mask.sum(1)
        case = (f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} of TinyCLIP(width 24) for {prompts} "
                f"({n_real.tolist()} real tokens each, padding zeroed)")
        expected = tokens[torch.arange(len(prompts)), n_real - 1]

        def hint(got, exp, tokens=tokens, mask=mask, n_real=n_real):
            rows = torch.arange(len(tokens))
            if _close(got, tokens[:, -1], 1e-6):
                return ("tokens[:, -1] is a padding slot for every prompt shorter than the context: pick position "
                        "mask.sum(1) - 1 of each prompt")
            if _close(got, (tokens * mask[..., None]).sum(1) / n_real[:, None], 1e-6):
                return "that is mean pooling; CLIP (and TinyCLIP) take the state of the [EOS] token, the last real one"
            if _close(got, tokens[rows, n_real.clamp(max=tokens.shape[1] - 1)], 1e-6):
                return "off by one: the last real token sits at index mask.sum(1) - 1 (positions count from 0)"
            if _close(got, tokens[:, 0], 1e-6):
                return "position 0 is [BOS], the same token opening every prompt; take the last real token"
            return ("CLIP pools the state of each prompt's last real token ([EOS]); prompts have different lengths, "
                    "and the mask says which slots are real",
                    "the index of the last real token comes from the mask's row sums; pick one row per prompt with "
                    "advanced indexing (a range of B with those indices)")

        got = _call("eos_pool", fn, case, tokens.clone(), mask.clone())
        worst = max(worst, _compare("eos_pool", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint))
        with torch.no_grad():  # projected and normalised, your state is TinyCLIP's pooled output
            worst = max(worst, _compare("eos_pool", F.normalize(clip.text_proj(got), dim=-1), pooled, case,
                                        atol=1e-5, rtol=1e-5))
    _ok("eos_pool", len(cases), "the pooled output of tld.text.TinyCLIP.encode", worst)


def _bpe_merge(words):
    counts: dict = {}
    for w in words:
        for pair in zip(w, w[1:]):
            counts[pair] = counts.get(pair, 0) + 1
    if not counts:
        return None, [list(w) for w in words]
    best = max(counts, key=counts.get)  # ties: the pair seen first
    out = []
    for w in words:
        merged, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                merged.append(w[i] + w[i + 1])
                i += 2
            else:
                merged.append(w[i])
                i += 1
        out.append(merged)
    return best, out


@checker("bpe_merge")
def check_bpe_merge(fn) -> None:
    """``fn(words) -> (pair, new_words)``: one step of byte-pair encoding (Sennrich et al. 2016). ``words`` is a list
    of words, each a list of symbols; ``pair`` is the most frequent pair of adjacent symbols over all words (ties:
    the pair seen first, reading the words in order), and ``new_words`` has every occurrence merged, left to right."""
    cases = [["aaa"], ["abab", "ab"], ["low", "lower", "newest", "widest"], ["a red circle", "a red square", "a blue"],
             shapes_captions(seed=2, n=20)]
    for texts in cases:
        words = [list(t) for t in texts]
        given = [list(w) for w in words]
        case = f"words {texts if len(texts) < 6 else f'of {len(texts)} shapes captions'} as lists of characters"
        expected = _bpe_merge(words)
        got = _call("bpe_merge", fn, case, given)
        if given != words:
            _fail("bpe_merge", "your function changed the words it was given", case, "build new lists")
        if not (isinstance(got, tuple) and len(got) == 2):
            _fail("bpe_merge", f"returned {type(got).__name__}, expected a tuple (pair, new_words)", case)
        pair, new = got
        if tuple(pair) != expected[0]:
            counts = {}
            for w in words:
                for p in zip(w, w[1:]):
                    counts[p] = counts.get(p, 0) + 1
            n_got, n_best = counts.get(tuple(pair), 0), counts[expected[0]]
            hint = (f"your pair occurs {n_got} times, the most frequent {n_best}" if n_got != n_best else
                    "a tie: take the pair seen first, reading the words in order and each word left to right")
            _fail("bpe_merge", f"pair {tuple(pair)!r}, expected {expected[0]!r}", case,
                  (hint, "count with a dict keyed by (left, right) over zip(word, word[1:])"))
        if [list(w) for w in new] != expected[1]:
            k = next(i for i, (a, b) in enumerate(zip(new, expected[1])) if list(a) != b) if len(new) == len(
                expected[1]) else None
            what = (f"word {k}: got {list(new[k])}, expected {expected[1][k]}" if k is not None else
                    f"{len(new)} words, expected {len(expected[1])}")
            _fail("bpe_merge", what, case,
                  ("merge left to right and skip past a merged pair: 'aaa' with the pair ('a', 'a') becomes "
                   "['aa', 'a'], each symbol is used once", "a while loop over the symbols with an index"))
    _ok("bpe_merge", len(cases), "one byte-pair merge (Sennrich et al. 2016)", 0.0)


CHANCE_OVER_UNIFORM = (2.0, 3.5)   # 256 shapes captions of seed 1: chance 0.0103, 2.6 x 1/256


@checker("chance_accuracy")
def check_chance_accuracy(fn) -> None:
    """``fn(captions) -> float``: the expected caption -> image retrieval accuracy of a model whose similarities are
    random (each row's argmax uniform over the n images), where a pick is right when its caption matches."""
    cases = [["a", "b"], ["a", "a", "b", "c"], shapes_captions(seed=1, n=64), shapes_captions(seed=1, n=256)]
    found = None
    for captions in cases:
        n = len(captions)
        case = f"{n} captions ({n - len(set(captions))} repeats)" + (f": {captions}" if n < 6 else "")
        expected = torch.tensor(sum(captions.count(c) for c in captions) / n**2, dtype=torch.float64)

        def hint(got, exp, n=n):
            if _close(got, torch.tensor(1 / n), 1e-9):
                return "1/n is chance only without repeated captions: a pick is also right on another copy"
            return ("caption i is right with probability (number of images with caption i) / n; average that over i",
                    "a collections.Counter of the captions")

        got = _scalar("chance_accuracy", _call("chance_accuracy", fn, case, list(captions)), case)
        _compare("chance_accuracy", got, expected, case, atol=1e-9, rtol=0, hint=hint)
        found = (got.item(), n, len(set(captions)))
    ratio = found[0] * found[1]
    if not CHANCE_OVER_UNIFORM[0] <= ratio <= CHANCE_OVER_UNIFORM[1]:
        raise CheckError(f"check_chance_accuracy: chance is {ratio:.2f} x 1/n, outside {CHANCE_OVER_UNIFORM}")
    _ok("chance_accuracy", len(cases), "the mean share of each caption", 0.0)
    print(f"  answer: at n = 256 chance is {found[0]:.4f}, {ratio:.1f}x 1/n, because shapes captions repeat "
          f"({found[2]} distinct ones): compare retrieval accuracies with that floor, not with 1/n")
