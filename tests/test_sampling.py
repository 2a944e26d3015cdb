"""Choosing among sampled answers (kvprobe.sampling): grader-made answer classes and the selection rules."""

import pytest

from kvprobe.sampling import RULES, VoteTable, answer_classes
from kvprobe.tasks import Item


def test_answer_classes_use_the_grader():
    classes, answers = answer_classes(Item("q", "What is 1/2?", "0.5"), [
        "Answer: 0.5", "Answer: $\\frac{1}{2}$", "Answer: 1/2", "Answer: 3", "no idea", "The answer is 3."])
    assert classes == [0, 0, 0, 1, -1, 1] and answers == ["0.5", "3"]  # 0.5 = \frac{1}{2} = 1/2; nothing extracted: -1
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
