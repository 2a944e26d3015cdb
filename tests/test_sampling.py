"""Choosing among sampled answers (kvprobe.sampling): grader-made answer classes and the selection rules."""

import pytest

from kvprobe.sampling import RULES, VoteTable, answer_classes, settled, stopped_at
from kvprobe.tasks import Item


def test_answer_classes_use_the_grader():
    classes, answers = answer_classes(Item("q", "What is 1/2?", "0.5"), [
        "Answer: 0.5", "Answer: $\\frac{1}{2}$", "Answer: 1/2", "Answer: 3", "no idea", "The answer is 3."])
    assert classes == [0, 0, 0, 1, -1, 1] and answers == ["0.5", "3"]  # 0.5 = \frac{1}{2} = 1/2; nothing extracted: -1
    # in waves: later responses join the classes found so far, numbered as if classified together
    first, known = answer_classes(Item("q", "What is 1/2?", "0.5"), ["Answer: 3", "Answer: 0.5"])
    rest, grown = answer_classes(Item("q", "What is 1/2?", "0.5"), ["Answer: 1/2", "no idea", "Answer: 7"], known)
    assert first + rest == [0, 1, 1, -1, 2] and known == ["3", "0.5"] and grown == ["3", "0.5", "7"]
    classes, answers = answer_classes(Item("q", "Pick one", "B", ("red", "blue", "green")), ["Answer: B", "The answer is (B)", "A", "no"])
    assert classes == [0, 0, 1, -1] and answers == ["B", "A"]


def test_rules_disagree_on_a_hand_built_table():
    # class A: three unsure wrong samples; B: two right ones the probe likes; C: one confident wrong one; one sample
    # without an answer, the most confident and best scored of all, which no rule may pick
    t = VoteTable(classes=[0, 0, 0, 1, 1, 2, -1], probe=[0.2, 0.2, 0.1, 0.6, 0.6, 0.9, 0.99],
                  confidence=[0.5, 0.5, 0.5, 0.3, 0.3, 0.9, 0.99], correct=[False, False, False, True, True, False, False])
    picks = {rule: t.choose(rule) for rule in RULES}
    assert picks == {"vote": 0, "probe_best": 2, "probe_vote": 1, "confidence_vote": 0, "max_prob_best": 2, "oracle": 1}
    assert t.choose("confidence_vote", eta=1 / 6) == 2  # keep the single most confident answered sample
    assert {rule: t.is_right(rule) for rule in RULES} == {"vote": False, "probe_best": False, "probe_vote": True,
                                                           "confidence_vote": False, "max_prob_best": False, "oracle": True}
    with pytest.raises(ValueError, match="not one of"):
        t.choose("median")
    with pytest.raises(ValueError, match="eta"):
        t.choose("confidence_vote", eta=0)


def test_ties_go_to_the_lower_class_or_the_earlier_sample_and_no_answer_is_wrong():
    t = VoteTable(classes=[1, 0, 1, 0], probe=[0.5] * 4, confidence=[0.5] * 4, correct=[False, True, False, True])
    assert t.choose("vote") == 0 and t.choose("probe_vote") == 0 and t.choose("probe_best") == 1  # probe_best: the earlier sample
    none = VoteTable(classes=[-1, -1], probe=[0.9, 0.9], confidence=[0.9, 0.9], correct=[False, False])
    assert all(none.choose(rule) is None and not none.is_right(rule) for rule in RULES)
    with pytest.raises(ValueError, match="one class, probe score"):
        VoteTable(classes=[0], probe=[], confidence=[0.1], correct=[True])


def test_early_stopping_rules():
    t = VoteTable(classes=[0, 1, 1, 1, 0, 0], probe=[0.9, 0.2, 0.3, 0.2, 0.9, 0.9], confidence=[0.5] * 6, correct=[True, False, False, False, True, True])
    # margin: after 2 samples class 0 leads 0.9 to 0.2; after 4, 0.9 to 0.7
    assert settled(t.head(2), "margin", 0.7, 2) and not settled(t.head(4), "margin", 0.7, 2)
    assert stopped_at(t, 6, 2, "margin", 0.7) == 2 and stopped_at(t, 6, 2, "margin", 1.0) == 6
    # votes: after 4 samples class 1 leads 3 to 1; after 6 it is 3 to 3
    assert stopped_at(t, 6, 2, "votes", 2) == 4 and stopped_at(t, 6, 1, "votes", 1) == 1 and not settled(t, "votes", 1, 2)
    # ESC: the first wave disagrees, the second agrees (1, 1)
    assert stopped_at(t, 6, 2, "agree", 0) == 4 and stopped_at(t, 5, 4, "agree", 0) == 5  # never more than n
    assert not settled(VoteTable([-1, -1], [0.9, 0.9], [0.5] * 2, [False] * 2), "agree", 0, 2)  # no answer is no agreement


def test_draw_samples_the_nucleus_exactly():
    """The top-k prefilter changes nothing: the empirical distribution of ``draw`` matches top-p over the whole
    vocabulary, and per-row generators make rows independent of their batch."""
    import torch

    from kvprobe.decoding import CANDIDATES, draw

    logits = torch.randn(1, 4 * CANDIDATES, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(-1)[0]
    ranked, order = probs.sort(descending=True)
    drop = (ranked.cumsum(-1) - ranked) >= 0.9
    want = probs.masked_fill(drop.scatter(-1, order, drop), 0)
    got = torch.bincount(draw(logits.expand(40000, -1), torch.Generator().manual_seed(1), 1.0, 0, 0.9), minlength=len(probs)) / 40000
    assert (got - want / want.sum()).abs().sum() < 0.06 and got[want == 0].sum() == 0
    flat = torch.zeros(3, 4 * CANDIDATES)  # the candidates hold too little mass: sampled over the vocabulary
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 5)]
    picked = draw(flat, gens, 1.0, 0, 0.9)
    assert picked[0] == picked[2] and picked[0] == draw(flat[:1], [torch.Generator().manual_seed(5)], 1.0, 0, 0.9)[0]
