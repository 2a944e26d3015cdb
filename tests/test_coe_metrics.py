"""CoE formulas against hand-computed cases, metric orientation, calibration, probe inputs."""

import math

import pytest
import torch

from kvprobe import calibration
from kvprobe.coe import coe_scores
from kvprobe.features import probe_input
from kvprobe.metrics import fpr_at_95_tpr, score_metrics


def test_coe_by_hand():
    # x0=(1,0) -> x1=(1,1) -> x2=(0,1): two unit steps, each turning 45 degrees; start to end: sqrt(2), 90 degrees
    r, c = coe_scores(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    mag, ang = 1 / math.sqrt(2), (math.pi / 4) / (math.pi / 2)
    assert r.item() == pytest.approx(mag - ang, abs=1e-6)
    assert c.item() == pytest.approx(abs(mag * complex(math.cos(ang), math.sin(ang))), abs=1e-6)
    # unequal steps: x0=(1,0) -> x1=(2,0) -> x2=(2,2)
    r, c = coe_scores(torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 2.0]]))
    z_mag, z_ang = math.hypot(1, 2), math.acos(2 / math.sqrt(8))  # cos((2,2), (1,0)) = 2 / sqrt(8)
    mags = [1 / z_mag, 2 / z_mag]
    angs = [0.0, (math.pi / 4) / z_ang]
    assert r.item() == pytest.approx(sum(mags) / 2 - sum(angs) / 2, abs=1e-6)
    expect_c = abs(sum(m * complex(math.cos(a), math.sin(a)) for m, a in zip(mags, angs)) / 2)
    assert c.item() == pytest.approx(expect_c, abs=1e-6)


def test_coe_degenerate_trajectories_are_finite():
    for traj in (torch.ones(4, 3), torch.zeros(4, 3), torch.ones(1, 3), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])):
        r, c = coe_scores(traj)
        assert torch.isfinite(r) and torch.isfinite(c)
    assert coe_scores(torch.ones(5, 3))[0].item() == 0.0  # no movement: no magnitude, no angle
    assert coe_scores(torch.ones(1, 3))[1].item() == 0.0  # a single point has no steps
    batch = torch.randn(6, 5, 8)
    r, c = coe_scores(batch)
    assert r.shape == (6,) and torch.allclose(r[2], coe_scores(batch[2])[0])


def test_metrics_keep_orientation():
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    good = labels.float() + 0.01 * torch.arange(8)
    assert score_metrics(good, labels, False)["auroc"] == 1.0
    assert score_metrics(-good, labels, False)["auroc"] == 0.0  # a reversed score is reported as such, never flipped
    assert fpr_at_95_tpr(good, labels) == 0.0
    m = score_metrics(torch.sigmoid(good), labels, True)
    assert "ece" in m and m["auroc_lo"] <= m["auroc"] <= m["auroc_hi"]
    with pytest.raises(ValueError, match="AUROC is undefined"):
        score_metrics(good, torch.ones(8), False)


def test_calibration_fits_on_given_logits():
    torch.manual_seed(0)
    true_logit = torch.randn(4000) * 2
    labels = torch.bernoulli(torch.sigmoid(true_logit))
    assert calibration.fit_temperature(true_logit * 3, labels) == pytest.approx(3.0, rel=0.15)
    x, y = calibration.fit_isotonic(true_logit, labels)
    assert torch.all(y[1:] >= y[:-1]) and torch.all(x[1:] > x[:-1])
    p = calibration.apply_isotonic(torch.tensor([-10.0, 0.0, 10.0]), x, y)
    assert p[0] <= p[1] <= p[2] and 0 <= p.min() and p.max() <= 1


def test_probe_input_pooling_by_hand():
    x = torch.arange(2 * 3 * 2 * 2 * 1, dtype=torch.float32).view(2, 3, 2, 2, 1)  # (batch, layers, kv, heads, dim)
    assert probe_input(x).shape == (2, 12)
    assert probe_input(x, layers=[-1], kv="k").tolist() == [[8.0, 9.0], [20.0, 21.0]]  # last layer, K, both heads
    assert probe_input(x, layers=[0], kv="v", head_pool="mean").tolist() == [[2.5], [14.5]]
    assert probe_input(x, kv="k", head_pool="mean", layer_pool="mean")[0].item() == (0.5 + 4.5 + 8.5) / 3


def test_paired_bootstrap_and_length_buckets_separate_information_from_length():
    from kvprobe.metrics import bucketed_auroc, paired_bootstrap_auroc

    g = torch.Generator().manual_seed(1)
    n = 400
    length = torch.rand(n, generator=g) * 200
    hidden = torch.randn(n, generator=g)  # what a good probe sees beyond length
    labels = ((200 - length) / 100 + 1.5 * hidden + 0.5 * torch.randn(n, generator=g) > 1).long()
    probe, length_only = -length / 100 + 1.5 * hidden, -length
    paired = paired_bootstrap_auroc(probe, length_only, labels)
    assert paired["lo"] > 0 and paired["lo"] <= paired["diff"] <= paired["hi"] and paired["p_le_0"] == 0
    same = paired_bootstrap_auroc(probe, probe, labels)
    assert same["diff"] == same["lo"] == same["hi"] == 0
    rows = bucketed_auroc({"probe": probe, "length": length_only}, labels, length, buckets=4)
    assert [r["n"] for r in rows[:-1]] == [100] * 4 and rows[-1]["n"] == 400
    assert rows[-1]["probe"] > 0.8 and rows[-1]["length"] < 0.7  # within a bucket, length explains little


def test_auroc_of_raw_scores_is_not_saturated():
    """Token counts (or any score far outside [0, 1]) rank like any score: torchmetrics' sigmoid once made them ties."""
    import torch

    from kvprobe.metrics import auroc_or_nan

    labels = torch.tensor([0, 0, 1, 1, 1])
    lengths = torch.tensor([60.0, 75.0, 120.0, 200.0, 75.0])
    assert auroc_or_nan(lengths, labels) == auroc_or_nan(lengths / 1000, labels) == pytest.approx(5.5 / 6)
