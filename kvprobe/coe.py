"""Label-free Chain-of-Embedding scores (Wang et al., ICLR 2025), on any trajectory x_0 .. x_N.

    Mag_i = ||x_{i+1} - x_i|| / ||x_N - x_0||            Ang_i = arccos cos(x_{i+1}, x_i) / arccos cos(x_N, x_0)
    CoE-R = mean Mag_i - mean Ang_i                        CoE-C = | mean_i Mag_i * exp(1j * Ang_i) |

Orientation is fixed: higher = more likely correct (the paper's), never flipped on test data.
Eps guards: a zero denominator (start and end coincide, or point the same way) becomes eps; the cosine of a zero
vector with anything counts as 1 (no turn), so degenerate trajectories score 0 instead of NaN. A trajectory with
fewer than two points has no steps and scores 0.

The layer axis uses per-layer KV pooled over the response (x_l = [K_l; V_l] flattened); the token axis uses the
per-token, layer-averaged KV; the same functions score pooled hidden states for the original CoE baseline.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(EPS)
    return torch.where((na < EPS) | (nb < EPS), torch.ones_like(cos), cos).clamp(-1.0, 1.0)


def coe_scores(traj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CoE-R, CoE-C) of trajectories shaped (..., N + 1, dim), computed in float64 for stable arccos."""
    x = traj.double()
    if x.shape[-2] < 2:
        zero = x.new_zeros(x.shape[:-2])
        return zero.float(), zero.float()
    steps = x[..., 1:, :] - x[..., :-1, :]
    mag_norm = (x[..., -1, :] - x[..., 0, :]).norm(dim=-1).clamp_min(EPS)
    ang_norm = torch.arccos(_cos(x[..., -1, :], x[..., 0, :])).clamp_min(EPS)
    mag = steps.norm(dim=-1) / mag_norm[..., None]
    ang = torch.arccos(_cos(x[..., 1:, :], x[..., :-1, :])) / ang_norm[..., None]
    coe_r = mag.mean(-1) - ang.mean(-1)
    coe_c = torch.sqrt((mag * torch.cos(ang)).mean(-1) ** 2 + (mag * torch.sin(ang)).mean(-1) ** 2)
    return coe_r.float(), coe_c.float()


def kv_layer_trajectory(response_kv: torch.Tensor) -> torch.Tensor:
    """(..., layers, 2, heads, dim) pooled KV -> (..., layers, 2*heads*dim): one point per layer."""
    return response_kv.flatten(-3)


def kv_token_trajectory(token_kv: torch.Tensor) -> torch.Tensor:
    """(tokens, 2, heads, dim) layer-averaged KV -> (tokens, 2*heads*dim): one point per answer token."""
    return token_kv.flatten(-3)
