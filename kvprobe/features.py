"""KV-derived features. The same functions run at capture time and, later, live inside the decode loop.

Coordinates: a batch is left-padded so every prompt ends at position ``P - 1``. A response of ``n`` tokens was
produced by the ``n`` positions ``[P - 1, P - 1 + n)``: the last prompt position emitted the first answer token, and
so on. Those are the response's positions here. (The last generated token is never fed back, so it has no KV; this
definition needs none and is never empty.) Padded and finished-early positions are excluded by index or with
``torch.where``, never by multiplying with a mask, because padded rows may hold non-finite values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvprobe.cache import KV
from kvprobe.typecheck import check_fields


@dataclass
class FeatureSpec:
    """What capture stores per item.

    Args:
        prompt_window: last positions of the prompt kept as raw KV (the difficulty probe's input, decided before
            decoding). 0 stores none.
        prompt_layers: layers whose prompt-window KV is stored; ``None`` stores every layer. Negative ids count
            from the last layer.
        token_trajectory: store the per-token, layer-averaged KV of the response (token-axis CoE), float16.
        hidden_states: also store per-layer hidden states pooled over the response (the original CoE input;
            for comparison; needs ``output_hidden_states`` and costs memory during generation).
        output_stats: store mean max-probability and mean entropy of the output distribution per answer.
    """

    prompt_window: int = 8
    prompt_layers: list[int] | None = None
    token_trajectory: bool = True
    hidden_states: bool = False
    output_stats: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "features")
        if self.prompt_window < 0:
            raise ValueError(f"features.prompt_window must be >= 0 (0 stores none), not {self.prompt_window}")

    def to_dict(self) -> dict:
        return asdict(self)

    def layer_ids(self, n_layers: int) -> list[int]:
        if self.prompt_layers is None:
            return list(range(n_layers))
        ids = [i % n_layers for i in self.prompt_layers]
        if any(not -n_layers <= i < n_layers for i in self.prompt_layers):
            raise ValueError(f"prompt_layers {self.prompt_layers} out of range for a model with {n_layers} layers")
        return ids


def response_index(prompt_end: int, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch ids, positions) of every response position in a padded batch, item by item."""
    lengths = lengths.to("cpu")
    batch = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return batch, prompt_end - 1 + offset


def pooled_response(pairs: list[KV], prompt_end: int, lengths: torch.Tensor) -> torch.Tensor:
    """Per-layer K and V averaged over each item's response positions: (batch, layers, 2, kv_heads, head_dim)."""
    start = prompt_end - 1
    offsets = torch.arange(pairs[0][0].shape[-2] - start)
    return pooled_positions(pairs, offsets[None] < lengths.cpu()[:, None], start)


def pooled_positions(pairs: list[KV], mask: torch.Tensor, start: int) -> torch.Tensor:
    """Per-layer K and V averaged over each row's positions marked in ``mask`` (batch, columns from ``start`` on):
    (batch, layers, 2, kv_heads, head_dim). Capture's responses are one run of columns; the live decode loop's
    answers may have padding inside (rows that finished, multi-token cues), so both mark positions with a mask.

    Layer by layer, so no copy of the whole cache is ever made; float32 accumulation whatever the model dtype;
    ``torch.where``, not a product, so non-finite padding never leaks in.
    """
    out = []
    for k, v in pairs:
        keep = mask.to(k.device, torch.bool)[:, None, :, None]  # (batch, 1, columns, 1)
        sums = torch.stack([torch.where(keep, x[:, :, start:].float(), 0.0).sum(2) for x in (k, v)], 1)
        out.append((sums / keep.sum(2).clamp_min(1).view(-1, 1, 1, 1)).to(pairs[0][0].device))
    return torch.stack(out, 1)


def token_trajectory(pairs: list[KV], prompt_end: int, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Per item, the layer-averaged K and V at each response position: a list of (n_i, 2, kv_heads, head_dim)."""
    batch, pos = response_index(prompt_end, lengths)
    device = pairs[0][0].device
    total = None
    for k, v in pairs:
        b, p = batch.to(k.device), pos.to(k.device)
        kv = torch.stack((k[b, :, p], v[b, :, p]), 1).float().to(device)
        total = kv if total is None else total + kv
    return list((total / len(pairs)).split(lengths.tolist()))


def prompt_window(pairs: list[KV], prompt_end: int, prompt_lengths: torch.Tensor, width: int, layers: list[int]) -> torch.Tensor:
    """Raw K and V of the last ``width`` prompt positions: (batch, len(layers), 2, kv_heads, width, head_dim).

    The prompts of a left-padded batch end at ``prompt_end``; a prompt shorter than ``width`` is zero-filled on the
    left (its padding is never read).
    """
    columns = torch.arange(prompt_end)
    mask = columns[None] >= prompt_end - prompt_lengths.cpu()[:, None]
    return window_kv(pairs, mask, width, layers)


def window_kv(pairs: list[KV], mask: torch.Tensor, width: int, layers: list[int]) -> torch.Tensor:
    """Raw K and V of each row's last ``width`` real positions, (batch, len(layers), 2, kv_heads, width, head_dim).

    ``mask`` (batch, columns) marks real positions; padding may sit anywhere (left padding, or inside the sequence
    where a batch fed a multi-token cue to some rows). Rows with fewer than ``width`` real positions are zero-filled
    on the left. Capture (the prompt's window) and live decoding (the latest tokens' window) both read windows here.
    """
    k0 = pairs[0][0]
    mask = mask[:, : k0.shape[-2]].bool().to(k0.device)
    batch, heads, _, dim = k0.shape
    columns = mask.shape[1]  # the mask may end before the cache does (a prompt's window inside a longer sequence)
    # columns of each row's last `width` real positions, in order; -1 marks a slot the row cannot fill
    key = torch.where(mask, torch.arange(columns, device=k0.device), -1)
    take = min(width, columns)
    cols = key.topk(take, dim=1).values.flip(1)
    if take < width:
        cols = torch.cat([torch.full((batch, width - take), -1, device=k0.device, dtype=cols.dtype), cols], 1)
    filled = cols >= 0
    # one stack of the short tail every row's window lies in, one gather: a few ops whatever the layer count
    # (per-layer gathers cost ~2-3 us of dispatch each, which dominates a probe call on CPU)
    start = int(torch.where(filled, cols, columns).min())
    tail = torch.stack([pairs[i][0][:, :, start:columns].to(k0.device) for i in layers]
                       + [pairs[i][1][:, :, start:columns].to(k0.device) for i in layers], 1)  # (batch, 2L, heads, n, dim)
    index = (cols - start).clamp_min(0)[:, None, None, :, None].expand(batch, tail.shape[1], heads, width, dim)
    out = torch.where(filled[:, None, None, :, None], tail.gather(3, index).float(), 0.0)  # never 0 * (padding's NaN)
    return out.view(batch, 2, len(layers), heads, width, dim).transpose(1, 2)


def pooled_hidden(step_hidden: tuple, lengths: torch.Tensor) -> torch.Tensor:
    """Per-layer hidden states averaged over the response positions: (batch, layers + 1, hidden).

    ``step_hidden`` is ``generate(..., output_hidden_states=True).hidden_states``: step 0 covers the prompt
    (its last position produced the first token), each later step one position.
    """
    per_step = [torch.stack([h[:, -1] for h in step], 1).float() for step in step_hidden]  # (batch, layers+1, hidden)
    stacked = torch.stack(per_step, 1)  # (batch, steps, layers+1, hidden)
    keep = torch.arange(stacked.shape[1], device=stacked.device)[None] < lengths.to(stacked.device)[:, None]
    summed = torch.where(keep[:, :, None, None], stacked, torch.zeros((), device=stacked.device)).sum(1)
    return summed / lengths.to(stacked.device).view(-1, 1, 1)


def step_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-probability and entropy of each row's next-token distribution (capture and the live decode loop)."""
    p = torch.softmax(logits.float(), -1)  # one softmax; xlogy gives 0 log 0 = 0 for masked (-inf) tokens
    return p.amax(-1), -torch.special.xlogy(p, p).sum(-1)


class OutputStats:
    """A logits processor that records max-probability and entropy of each step's distribution, unchanged.

    Keeping these two numbers per step avoids holding every step's full logits (vocab x steps x batch).
    """

    def __init__(self):
        self.max_prob: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        max_prob, entropy = step_stats(scores)
        self.max_prob.append(max_prob)
        self.entropy.append(entropy)
        return scores

    def means(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean max-prob and mean entropy over each item's own generated tokens."""
        keep = torch.arange(len(self.max_prob))[None] < lengths.cpu()[:, None]
        out = []
        for series in (self.max_prob, self.entropy):
            values = torch.stack(series, 1).cpu()
            out.append(torch.where(keep, values, 0).sum(1) / lengths.cpu())
        return out[0], out[1]


def pool_positions(window: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Raw window KV (..., positions, head_dim) -> (..., head_dim) by ``sum``, ``mean`` or ``last`` position.

    Live decoding keeps running sums of the same positions, so it reaches the same values without this call.
    """
    if how == "sum":
        return window.sum(-2)
    if how == "mean":
        return window.mean(-2)
    if how == "last":
        return window[..., -1, :]
    raise ValueError(f"position pooling {how!r} is not sum, mean or last")


def probe_input(
    x: torch.Tensor, layers: list[int] | None = None, kv: str = "both", head_pool: str = "flatten",
    layer_pool: str = "flatten", l2_norm: bool = False,
) -> torch.Tensor:
    """Pooled per-layer KV (batch, layers, 2, heads, dim) -> probe input (batch, features), as configured.

    ``kv``: ``k``, ``v`` or ``both``; ``head_pool``: ``flatten`` or ``mean``; ``l2_norm`` scales each layer's
    vector to unit length (the norm grows with depth; this evens the layers out); ``layer_pool``: ``flatten``,
    ``mean`` or ``sum``. The same call serves the captured tensors and the live ones.
    """
    if layers is not None:
        x = x[:, [i % x.shape[1] for i in layers]]
    x = {"k": x[:, :, :1], "v": x[:, :, 1:], "both": x}[kv]
    x = x.mean(3) if head_pool == "mean" else x.flatten(3)  # (batch, layers, kv, features)
    x = x.flatten(2)
    if l2_norm:
        x = torch.nn.functional.normalize(x, dim=-1)
    if layer_pool == "mean":
        return x.mean(1)
    if layer_pool == "sum":
        return x.sum(1)
    return x.flatten(1)
