"""The switch probe's pieces by hand: settled labels, trajectory windows, the replayed policy and its calibration;
and the switch data and probe end to end on a tiny model."""

import json

import pytest
import torch

from kvprobe import switching
from kvprobe.fit import main
from kvprobe.probes import SwitchProbe


def char_ends(text: str) -> list[int]:
    """One token per character: token i ends at offset i + 1."""
    return list(range(1, len(text) + 1))


def test_settled_at_counts_results_not_operands():
    text = "42 + 8 = 50, then 50 - 8 = 42.\nAnswer: 42"
    assert switching.settled_at(text, "42", char_ends(text)) == text.index("= 42") + 4  # the operand 42 is no result
    assert switching.settled_at(text, "50", char_ends(text)) == text.index("= 50") + 4
    assert switching.settled_at("so the total is 7.", "7", char_ends("so the total is 7.")) == 17
    assert switching.settled_at("x = 420", "42", char_ends("x = 420")) is None  # 42 is not 420
    assert switching.settled_at("x = 42.5", "42", char_ends("x = 42.5")) is None
    assert switching.settled_at("Answer: -3", "-3", char_ends("Answer: -3")) == 10
    assert switching.settled_at("no result here", "3", char_ends("no result here")) is None
    assert switching.settled_at("= 3", "", char_ends("= 3")) is None  # nothing extracted: never settled
    assert switching.settled_at("a = 12", "12", [2, 4, 6]) == 3  # token ends, not characters, count


def test_trajectory_windows_by_hand():
    x = torch.arange(1.0, 6.0).view(5, 1, 1, 1)  # entries 1..5
    w = switching.trajectory_windows(x, 2).flatten().tolist()
    assert w == [0.5, 1.5, 2.5, 3.5, 4.5]  # t=1: (0 + 1) / 2 zero-filled; t=3: (2 + 3) / 2
    assert switching.trajectory_windows(x, 1).flatten().tolist() == [1, 2, 3, 4, 5]


def policy_data():
    """Two answers of 10 tokens. Answer 0 (right) settles at t=6; answer 1 (wrong) never settles."""
    scores = {0: [0.9, 0.9, 0.8, 0.9, 0.7, 0.2, 0.1, 0.1, 0.1, 0.1], 1: [0.3, 0.2, 0.6, 0.4, 0.35, 0.6, 0.6, 0.6, 0.6, 0.6]}
    s = torch.tensor(scores[0] + scores[1])
    t = torch.tensor(list(range(1, 11)) * 2)
    a = torch.tensor([0] * 10 + [1] * 10)
    answers = {0: {"n": 10, "settled": 6, "correct": True}, 1: {"n": 10, "settled": None, "correct": False}}
    return s, t, a, answers


def test_simulate_arms_before_it_cuts_and_counts_losses():
    s, t, a, answers = policy_data()
    out = switching.simulate(s, t, a, answers, low=0.25, high=0.5, min_tokens=1, answer_tokens=1)
    # answer 0: armed at t=1, first score < 0.25 at t=6 (settled: safe), saves 10 - 6 - 1 = 3
    # answer 1: 0.2 at t=2 comes before the arm (0.6 at t=3); later scores never drop below 0.25: no cut
    assert out == {"saved_tokens": 1.5, "cut_share": 0.5, "lost_share": 0.0}
    out = switching.simulate(s, t, a, answers, low=0.75, high=0.5, min_tokens=1, answer_tokens=1)
    # answer 0 is cut at t=5 (0.7), before its result: lost; answer 1 at t=4 (0.4), wrong anyway: not lost
    assert out["cut_share"] == 1.0 and out["lost_share"] == 0.5 and out["saved_tokens"] == (4 + 5) / 2
    # from t=7 answer 0's scores are all low but it never armed there: no cut; answer 1 arms at 7, is cut at 8
    out = switching.simulate(s, t, a, answers, low=0.75, high=0.5, min_tokens=7, answer_tokens=1)
    assert out == {"saved_tokens": 0.5, "cut_share": 0.5, "lost_share": 0.0}
    # probes at t=4 and 8 only: answer 0 arms at 4, is cut at 8; answer 1 (0.4 at 4) arms only at 8
    out = switching.simulate(s, t, a, answers, low=0.25, high=0.5, min_tokens=1, every=4, answer_tokens=1)
    assert out == {"saved_tokens": 0.5, "cut_share": 0.5, "lost_share": 0.0}


def test_calibrate_respects_the_loss_budget():
    """Answer 0 (right, 20 tokens, settled at 8) dips to 0.6 early and to 0.1 once settled; answer 1 never arms.
    A cut threshold above 0.6 saves more but cuts answer 0 before its result; only a loose budget allows that."""
    s = torch.tensor([0.99] + [0.6] * 6 + [0.1] * 13 + [0.3] * 10)
    t = torch.tensor(list(range(1, 21)) + list(range(1, 11)))
    a = torch.tensor([0] * 20 + [1] * 10)
    answers = {0: {"n": 20, "settled": 8, "correct": True}, 1: {"n": 10, "settled": None, "correct": False}}
    strict = switching.calibrate(s, t, a, answers, high=0.9, min_tokens=1, max_lost=0.0)
    assert strict["lost_share"] == 0.0 and strict["saved_tokens"] == (20 - 8 - 3) / 2 and 0.1 < strict["low"] <= 0.6
    loose = switching.calibrate(s, t, a, answers, high=0.9, min_tokens=1, max_lost=0.5)
    assert loose["lost_share"] == 0.5 and loose["saved_tokens"] == (20 - 2 - 3) / 2 and 0.6 < loose["low"] < 0.9


@pytest.mark.parametrize("kv, head_pool, head", [("both", "flatten", "mlp"), ("k", "mean", "mlp"), ("v", "flatten", "linear")])
def test_live_switch_equals_the_probe_on_the_window_mean(kv, head_pool, head):
    """The decode loop's rearranged probe (positions projected as they come, a window's projections summed) scores
    what the probe scores on the window's mean, for every head and pooling option."""
    probe = SwitchProbe(kv=kv, head_pool=head_pool, head=head, hidden_dim=16)
    g = torch.Generator().manual_seed(0)
    probe._build(probe.pooled_inputs(torch.zeros(1, 2, 3, 8)).shape[1])
    probe.mean.normal_(generator=g)
    probe.std.uniform_(0.5, 2.0, generator=g)
    probe.eval()
    positions = torch.randn(4, 5, 2, 3, 8, generator=g)  # (batch, window positions, 2, heads, dim)
    live = probe.live(window=5)
    read = {"k": slice(0, 1), "v": slice(1, 2), "both": slice(0, 2)}[kv]  # the parts the decode loop reads
    summed = sum(live.project(positions[:, i, read]) for i in range(5))
    want = probe.score(probe(probe.pooled_inputs(positions.mean(1))))
    torch.testing.assert_close(torch.tensor(live.scores(summed)), want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0


def test_switch_fit_end_to_end(tiny_models, tmp_path):
    """Capture both modes on a tiny model, fit the switch probe, calibrate, test and export its thresholds."""
    args = ["--config", "configs/switch.yaml", "--data.difficulty.capture.model.name", str(tiny_models["llama"]), "--data.difficulty.capture.model.dtype", "float32",
            "--data.difficulty.capture.task.name", "arithmetic", "--data.difficulty.capture.task.params", '{"n": 30, "seed": 3}', "--data.difficulty.capture.task.grader", "graders.parity",
            "--data.settled_at", "graders.halfway",
            "--data.difficulty.capture.generation.max_new_tokens", '{"fast": 4, "slow": 20}', "--data.difficulty.capture.generation.batch_size", "8",
            "--data.difficulty.capture.features.hidden_states", "false", "--data.difficulty.cache_dir", str(tmp_path / "captures"), "--data.window", "4",
            "--model.min_tokens", "4", "--trainer.logger", "false", "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--export_dir", str(tmp_path / "switch")]
    results = main(args)
    config = json.loads((tmp_path / "switch" / "probe.json").read_text())
    assert config["switch"]["window"] == 4 and config["probe_class"].endswith("SwitchProbe")
    low, high = config["calibration"]["thresholds"]["switch_low"], config["calibration"]["thresholds"]["switch_high"]
    assert 0.0 <= low < high == 0.5
    assert min(results["items"].values()) > 0  # windows per split
    policy = results["test"]["policy"]
    assert policy["answers"] == 6 and 0.0 <= policy["lost_share"] <= policy["cut_share"] <= 1.0
    with pytest.raises(ValueError, match="token_trajectory"):
        main(args + ["--data.difficulty.capture.features.token_trajectory", "false"])


def test_settled_at_with_a_real_tokenizer(tiny_models):
    """Token ends from a tokenizer's offset mapping: the first `settled` tokens decode to text holding the result,
    one token fewer does not."""
    from kvprobe.models import load_tokenizer

    tok = load_tokenizer(str(tiny_models["qwen2"]))
    response = "First, 12 + 30 = 42. Then 42 - 8 = 34.\nAnswer: 34"
    ids = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    at = switching.settled_at(response, "34", [end for _, end in ids["offset_mapping"]])
    assert "= 34" in tok.decode(ids["input_ids"][:at]) and "= 34" not in tok.decode(ids["input_ids"][: at - 1])
