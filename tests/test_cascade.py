"""Offline cascades (kvprobe.cascade): decisions, costs, joint calibration on validation only."""

import math

import pytest
import torch

from kvprobe import cascade
from kvprobe.routing import Outcomes


def outcomes(fast_correct, slow_correct, fast_tokens=None, slow_tokens=None) -> Outcomes:
    n = len(fast_correct)
    return Outcomes(torch.tensor(fast_correct, dtype=torch.float), torch.tensor(slow_correct, dtype=torch.float),
                    torch.tensor(fast_tokens or [2.0] * n), torch.tensor(slow_tokens or [20.0] * n))


def test_decisions_and_costs_count_both_attempts():
    o = outcomes([1, 0, 0, 1], [1, 1, 0, 0], [2, 3, 4, 5], [10, 20, 30, 40])
    s = cascade.Signals(route=torch.tensor([0.9, 0.1, 0.2, 0.3]), escalate=1 - torch.tensor([0.9, 0.1, 0.2, 0.8]))
    slow, esc = cascade.decide("route+verify", s, (0.5, 0.5))
    assert slow.tolist() == [True, False, False, False] and esc.tolist() == [False, True, True, False]
    pq = cascade.outcome(o, slow, esc)
    assert pq["correct"].tolist() == [1, 1, 0, 1]
    assert pq["tokens"].tolist() == [10, 3 + 20, 4 + 30, 5]  # an escalated question pays its fast answer and slow mode
    r = cascade.summary(pq, float(o.slow_tokens.mean()))
    assert r["accuracy"] == 0.75 and r["mean_tokens"] == pytest.approx((10 + 23 + 34 + 5) / 4) and r["escalated"] == 0.5
    assert cascade.decide("verify", s, (0.5,))[1].tolist() == [False, True, True, False]
    assert not cascade.decide("route", s, (0.5,))[1].any()
    conf, helps = torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.1])
    assert cascade.escalation("wrong", conf).tolist() == pytest.approx([0.1, 0.8])
    assert cascade.escalation("gain", conf, helps).tolist() == pytest.approx([0.05, 0.08])
    with pytest.raises(ValueError, match="four-class"):
        cascade.escalation("gain", conf)
    with pytest.raises(ValueError, match="not one of"):
        cascade.decide("sometimes", s, (0.5,))


def test_calibration_meets_the_budget_and_prefers_accuracy():
    # escalating the two wrong fast answers that slow mode gets right (verify 0.1, 0.2) is best; escalating the third
    # wrong one (0.3: slow is wrong too) only costs tokens
    o = outcomes([1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0])
    s = cascade.Signals(route=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), escalate=1 - torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3]))
    cal = cascade.calibrate("verify", s, o, token_ratio=1.0)
    assert cal["fits"] and cal["val_accuracy"] == pytest.approx(5 / 6) and 0.7 < cal["thresholds"][0] < 0.8
    assert cal["val_mean_tokens"] <= 20.0
    cheap = cascade.calibrate("verify", s, o, token_ratio=0.15)  # 3 tokens: only escalating nothing fits
    assert cheap["fits"] and cheap["val_escalated"] == 0 and cheap["val_accuracy"] == 0.5
    none = cascade.calibrate("verify", s, o, token_ratio=0.01)  # nothing fits: the cheapest, marked
    assert not none["fits"] and none["val_mean_tokens"] == 2.0
    loss = cascade.calibrate("route+verify", s, o, max_loss=0.2, points=7)  # always-slow: 4/6
    assert loss["fits"] and loss["val_accuracy"] >= 4 / 6 - 0.2 and loss["val_mean_tokens"] < 20
    with pytest.raises(ValueError, match="token_ratio or max_loss"):
        cascade.calibrate("verify", s, o)


def test_joint_calibration_never_reads_test_rows():
    g = torch.Generator().manual_seed(0)
    n = 40
    val = (cascade.Signals(torch.rand(n, generator=g), torch.rand(n, generator=g)),
           outcomes(torch.randint(0, 2, (n,), generator=g).tolist(), torch.randint(0, 2, (n,), generator=g).tolist(),
                    torch.randint(1, 5, (n,), generator=g).float().tolist(), torch.randint(20, 90, (n,), generator=g).float().tolist()))
    test = (cascade.Signals(torch.rand(n, generator=g), torch.rand(n, generator=g)), val[1])
    poisoned = (cascade.Signals(torch.full((n,), math.nan), torch.full((n,), math.nan)),
                outcomes([0] * n, [1] * n, [1.0] * n, [1000.0] * n))
    for policy in cascade.POLICIES:
        a = cascade.calibrate_then_test(policy, val, test, token_ratio=0.5)
        b = cascade.calibrate_then_test(policy, val, poisoned, token_ratio=0.5)
        assert a["thresholds"] == b["thresholds"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["accuracy"] != b["accuracy"] or a["mean_tokens"] != b["mean_tokens"]  # the test rows were used after


def test_paired_bootstrap_brackets_the_mean_difference():
    a, b = torch.tensor([1.0] * 30 + [0.0] * 10), torch.tensor([1.0] * 20 + [0.0] * 20)
    d = cascade.paired_bootstrap(a, b)
    assert d["diff"] == pytest.approx(0.25) and d["lo"] < 0.25 < d["hi"] and d["lo"] > 0


def test_best_within_is_the_frontier_inside_the_budget():
    o = outcomes([1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0])
    s = cascade.Signals(route=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), escalate=1 - torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3]))
    assert cascade.best_within("verify", s, o, 1.0) == pytest.approx(5 / 6)
    assert cascade.best_within("verify", s, o, 0.15) == pytest.approx(0.5)  # 3 tokens: nothing can escalate
    assert math.isnan(cascade.best_within("verify", s, o, 0.01))
