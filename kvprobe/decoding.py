"""Drawing the next token: temperature, top-k, top-p, with one random generator per row. Capture (through
``generate``, as ``DrawTokens``) and the decode engine call the same ``draw``, so a capture's sample ``j`` of a
question is the engine's sample ``j`` of it under the same seed.

Why not transformers' own sampling: its top-p sorts the whole vocabulary and draws from all of it each step, which on
a 151k-token vocabulary and 64 rows costs ~0.6 s a step on two CPU cores, more than the model's forward. Here the
``CANDIDATES`` most likely tokens are taken first (``topk``); a row whose top-p mass those hold (nearly always) is
sampled among them, which is exact: every token beyond them ranks below the nucleus. A row they do not cover is
sampled over the whole vocabulary, as before.
"""

from __future__ import annotations

import torch

CANDIDATES = 1024


def draw(logits: torch.Tensor, generators: list[torch.Generator | None] | torch.Generator | None, temperature: float = 1.0,
         top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampled token of each row of ``logits`` (rows, vocab): the distribution divided by ``temperature``, cut to
    the ``top_k`` most likely tokens (0 = all), then to the smallest set whose mass reaches ``top_p``. ``generators``:
    one per row, or one for every row, or None (torch's global generator)."""
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    k = min(top_k or vocab, vocab)
    per_row = isinstance(generators, (list, tuple))
    if k > CANDIDATES and top_p >= 1.0:  # the whole distribution
        return _multinomial(logits.softmax(-1), None, generators, per_row)
    values, order = logits.topk(min(k, CANDIDATES), -1)  # sorted, most likely first
    # log of the normaliser over the tokens top-k keeps: all of them (the full vocabulary) or the candidates
    log_z = logits.logsumexp(-1, keepdim=True) if k > CANDIDATES else values.logsumexp(-1, keepdim=True)
    probs = (values - log_z).exp()
    covered = (probs.sum(-1) >= top_p) | (k <= CANDIDATES)  # the nucleus lies among the candidates
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # keep a token while the mass ranked above it is short of top_p
    out = _multinomial(probs, order, generators, per_row)
    for i in torch.nonzero(~covered).flatten().tolist():  # rare: a flat distribution, sampled over the vocabulary
        out[i] = _multinomial(_nucleus(logits[i:i + 1], top_p), None, [generators[i]] if per_row else generators, per_row)[0]
    return out


def _multinomial(probs: torch.Tensor, order: torch.Tensor | None, generators, per_row: bool) -> torch.Tensor:
    """One draw per row of ``probs`` (row i from ``generators[i]`` when ``per_row``), mapped through ``order``."""
    if per_row:
        picked = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
    else:
        picked = torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    return picked if order is None else order.gather(-1, picked[:, None]).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p probabilities over the whole vocabulary: the rare rows the candidates do not cover."""
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    return probs.masked_fill(drop.scatter(-1, order, drop), 0.0)


class DrawTokens:
    """A logits processor that makes greedy ``generate`` sample: it draws each row's token with ``draw`` (row ``i``
    from ``generators[i]``) and leaves that token the only finite score, so greedy decoding picks it. Put it after any
    processor that should see the model's own distribution (``features.OutputStats``)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_k: int, top_p: float):
        self.generators, self.temperature, self.top_k, self.top_p = generators, temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = draw(scores, self.generators, self.temperature, self.top_k, self.top_p)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


def row_generators(seeds: list[int], device) -> list[torch.Generator]:
    """One seeded generator per row."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
