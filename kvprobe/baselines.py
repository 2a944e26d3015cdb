"""Every label-free score of a captured answer, each oriented higher = more likely correct.

KV-CoE on the layer and token axes, hidden-state CoE (when captured), mean max-probability and negative mean
entropy, and the trivial ones any report must show beside them: negative response length (shorter = correct)
and finished-before-the-cap. Computed from the stored tensors with the same functions live decoding uses.
"""

from __future__ import annotations

import torch

from kvprobe.coe import coe_scores, kv_layer_trajectory, kv_token_trajectory


def label_free_scores(shards: list[dict[str, torch.Tensor]], rows: list[dict]) -> dict[str, torch.Tensor]:
    """name -> (n_items,) float32, in the capture's row order."""
    parts: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.float().reshape(-1))

    for shard in shards:
        r, c = coe_scores(kv_layer_trajectory(shard["response_kv"].float()))
        add("kv_coe_r_layer", r)
        add("kv_coe_c_layer", c)
        if "token_kv" in shard:
            offsets = shard["token_offsets"].tolist()
            tokens = shard["token_kv"]
            per_item = [coe_scores(kv_token_trajectory(tokens[a:b].float())) for a, b in zip(offsets[:-1], offsets[1:])]
            add("kv_coe_r_token", torch.stack([s[0] for s in per_item]))
            add("kv_coe_c_token", torch.stack([s[1] for s in per_item]))
        if "hidden" in shard:
            r, c = coe_scores(shard["hidden"].float())
            add("hs_coe_r", r)
            add("hs_coe_c", c)
    out = {name: torch.cat(values) for name, values in parts.items()}
    out["neg_length"] = -torch.tensor([r["gen_tokens"] for r in rows], dtype=torch.float32)
    out["finished"] = torch.tensor([float(r["finished"]) for r in rows])
    if rows and rows[0].get("max_prob") is not None:
        out["max_prob"] = torch.tensor([r["max_prob"] for r in rows], dtype=torch.float32)
        out["neg_entropy"] = torch.tensor([-r["entropy"] for r in rows], dtype=torch.float32)
    return out
