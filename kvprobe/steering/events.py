"""What generation gives back: one ``GenerationResult`` per prompt, and the typed events ``stream()`` yields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """One sampled answer of a ``sample`` run."""

    text: str
    tokens: int  # decoded tokens
    confidence: float | None  # the correctness probe's P(correct), from this sample's own cache
    mean_max_prob: float | None  # mean max-probability of its tokens (DeepConf's token confidence); None: not kept
    answer: int  # its answer class (``answers[answer]``), -1 when no answer could be extracted


@dataclass
class GenerationResult:
    """What happened for one prompt (under ``sample``: its samples together: the chosen answer's text and
    confidence, every sample's tokens). ``tokens`` counts every decoded token per mode (the token decoded at a
    switch counts in the mode that decoded it); cue tokens are forced, not decoded, and counted apart: the ids fed at
    the switch beyond the decoded token (``cue_block``: the decoded token and the cue, tokenised as text)."""

    text: str
    mode: str  # the mode decoding started in (after routing)
    final_mode: str  # the mode it ended in (after a switch)
    route_score: float | None
    switched_at: int | None  # decoded tokens before the switch
    switch_score: float | None
    tokens: dict[str, int]
    cue_tokens: int
    prompt_tokens: int  # prompt positions prefilled (both modes' shared prefix counted once)
    confidence: float | None  # calibrated P(correct) from the correctness probe of the answer's mode (None: no such probe)
    seconds: float
    probe_seconds: float
    reprompt_tokens: int = 0  # of prompt_tokens, those prefilled when the row moved to another mode (routed, escalated)
    escalated: bool = False  # a fast answer was checked, found likely wrong and answered again in slow mode
    verify_score: float | None = None  # the escalation score of the fast answer that was checked (``verify`` policies)
    samples: list[Sample] | None = None  # ``sample``: every sample drawn, in drawing order (``text`` is the chosen one's)
    answers: list[str] | None = None  # ``sample``: each answer class's answer (classes by the task's grader)
    chosen: int | None = None  # ``sample``: the answer class the ``select`` rule picked (None: no sample answered)
    token_ids: list[int] = field(repr=False, default_factory=list)
    switch_trace: list[tuple[int, float]] = field(repr=False, default_factory=list)  # (decoded tokens, switch score)

    @property
    def decoded_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclass
class Event:
    row: int  # which prompt of the call


@dataclass
class RouteEvent(Event):
    """The router picked ``mode`` for this prompt before decoding."""

    mode: str
    score: float
    threshold: float


@dataclass
class TextEvent(Event):
    """New text of this prompt's answer (under ``sample``: of its sample ``sample``)."""

    text: str
    sample: int | None = None


@dataclass
class SwitchEvent(Event):
    """The answer switched mode after ``at`` decoded tokens."""

    at: int
    score: float
    to: str


@dataclass
class EscalateEvent(Event):
    """The fast answer ``dropped`` has escalation score ``score`` > ``threshold`` (``SteeringSpec.escalate_on``): it is
    answered again in slow mode."""

    score: float
    threshold: float
    dropped: str


@dataclass
class DoneEvent(Event):
    """This prompt's answer is finished (``sample``: which of its copies, when ``Copies`` answers it several times)."""

    result: GenerationResult
    sample: int | None = None
