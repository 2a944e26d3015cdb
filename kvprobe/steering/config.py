"""What a caller sets: how the generator steers (``SteeringSpec``, saved with it) and how it decodes
(``GenerationConfig``, per call, as in transformers)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from kvprobe.cascade import ESCALATE_ON
from kvprobe.sampling import RULES, STOP_ON
from kvprobe.prompts import MODES, check_token_caps


LIVE_RULES = tuple(r for r in RULES if r != "oracle")  # the oracle needs the gold answer
POLICIES = ("fast", "slow", "route", "route+switch", "verify", "route+verify", "sample", "oracle")


def _is_number(value) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python, never a threshold to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class SteeringSpec:
    """How a generator steers; saved in ``generator.json`` beside its probes.

    Args:
        policy: what ``generate`` does when a call names no policy (one of ``POLICIES``): ``kvprobe study`` saves
            the policy it chose on validation here.
        threshold: the difficulty score above which a question goes to slow mode: the name of one of the probe's
            calibrated thresholds (see its export), or a number.
        switch_low: ``route+switch``: an armed slow answer whose switch score drops below this stops reasoning;
            ``None`` = the switch probe's calibrated value.
        switch_high: the switch arms once the score has risen above this (hysteresis); ``None`` = the probe's.
        probe_every: score the live window every this many decoded tokens; ``None`` = what the switch probe was
            calibrated for.
        min_tokens: no switch before this many decoded tokens; ``None`` = the switch probe's.
        answer_cue: appended to switch slow -> fast (prompt-based modes; for hybrid thinking models use the
            template's end-of-thinking text, e.g. ``</think>``).
        escalate_on: ``verify`` and ``route+verify``: what a fast answer is escalated on (``kvprobe.cascade.escalation``):
            ``wrong`` = 1 - P(correct) of the fast-answer correctness probe; ``gain`` = that times P(slow right |
            fast wrong) from a four-class difficulty probe.
        escalate_above: a fast answer whose escalation score is above this is answered again in slow mode.
        verify_route_threshold: ``route+verify``: the difficulty score above which a question goes straight to slow
            mode (a calibrated name or a number, like ``threshold``); ``None`` = ``threshold``. Calibrated jointly
            with ``escalate_above`` by ``kvprobe study`` (``kvprobe.cascade.calibrate``).
        samples: ``sample``: answers drawn per question (at most; fewer when early stopping settles sooner).
        select: ``sample``: the rule that picks the answer among them (``kvprobe.sampling``): ``vote``,
            ``probe_vote``, ``probe_best``, ``confidence_vote`` or ``max_prob_best``.
        eta: ``confidence_vote``: the most confident share of the samples that votes (DeepConf's top-eta).
        wave: ``sample`` with early stopping: samples drawn at a time.
        stop_on: ``sample``: the early-stopping rule (``kvprobe.sampling.settled``): ``margin`` (the leading class's
            summed P(correct) ahead of the runner-up's by ``stop_at``), ``votes`` (ahead by ``stop_at`` votes; no probe
            needed) or ``agree`` (ESC: a wave answers as one).
        stop_at: the threshold of ``margin`` or ``votes``; ``None`` = no early stopping for them (all ``samples`` in
            one wave). ``margin``'s is calibrated on validation by ``python -m reports.sampling``.
    """

    policy: str = "route"
    threshold: str | float = "best_at_0.5x_slow"
    switch_low: float | None = None
    switch_high: float | None = None
    probe_every: int | None = None
    min_tokens: int | None = None
    answer_cue: str = "\n\nAnswer:"
    escalate_on: str = "wrong"
    escalate_above: float = 0.5
    verify_route_threshold: str | float | None = None
    samples: int = 8
    select: str = "probe_vote"
    eta: float = 0.9
    wave: int = 2
    stop_on: str = "margin"
    stop_at: float | None = None

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"steering {name} must be {what}, not {getattr(self, name)!r}")

        need(self.policy in POLICIES and self.policy != "oracle", "policy", f"one of {POLICIES[:-1]}")
        need(_is_number(self.threshold) or (isinstance(self.threshold, str) and bool(self.threshold)), "threshold",
             "a number or the name of one of the difficulty probe's calibrated thresholds")
        need(self.verify_route_threshold is None or _is_number(self.verify_route_threshold)
             or (isinstance(self.verify_route_threshold, str) and bool(self.verify_route_threshold)),
             "verify_route_threshold", "None, a number or the name of a calibrated threshold")
        for name in ("switch_low", "switch_high", "stop_at"):
            need(getattr(self, name) is None or _is_number(getattr(self, name)), name, "None or a number")
        need(_is_number(self.escalate_above), "escalate_above", "a number")
        need(self.probe_every is None or (type(self.probe_every) is int and self.probe_every >= 1), "probe_every",
             "None or a whole number >= 1")
        need(self.min_tokens is None or (type(self.min_tokens) is int and self.min_tokens >= 0), "min_tokens",
             "None or a whole number >= 0")
        need(isinstance(self.answer_cue, str) and bool(self.answer_cue), "answer_cue", "a non-empty string")
        need(_is_number(self.eta), "eta", "a number in (0, 1]")
        if self.escalate_on not in ESCALATE_ON:
            raise ValueError(f"escalate_on {self.escalate_on!r} is not one of {ESCALATE_ON}")
        for name in ("samples", "wave"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        if self.select not in LIVE_RULES:
            raise ValueError(f"select {self.select!r} is not one of {LIVE_RULES}")
        if self.stop_on not in STOP_ON:
            raise ValueError(f"stop_on {self.stop_on!r} is not one of {STOP_ON}")
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], not {self.eta!r}")

    @property
    def early_stop(self) -> bool:
        """Whether ``sample`` draws in waves (ESC's rule always does; ``margin`` once ``stop_at`` is set)."""
        return self.stop_on == "agree" or self.stop_at is not None


@dataclass
class GenerationConfig:
    """How each answer is decoded; the fields and their meaning follow transformers' ``GenerationConfig``.

    Args:
        max_new_tokens: cap on decoded tokens, one number for both modes or ``{mode: cap}``; ``None`` = the caps the
            probes were captured with.
        do_sample: sample instead of greedy decoding.
        temperature: divides the logits before sampling.
        (``do_sample``, ``temperature`` and ``top_p`` may also be lists, one value per prompt, like ``seed``: a server
        batches requests with different settings.)
        top_k: sample among the ``top_k`` most likely tokens only (0 = all).
        top_p: sample among the most likely tokens whose probabilities add up to ``top_p`` (1.0 = all).
        seed: seeds the sampling generator of each call, so a call is reproducible; a list gives each prompt its own
            generator (one seed per prompt), so that a prompt samples the same answer alone or in any batch (as
            far as the batch's float sums allow); ``None`` = torch's global RNG.
        stop_strings: an answer ends once its text contains one of these (kept in the text, as in transformers).
    """

    max_new_tokens: int | dict[str, int] | None = None
    do_sample: bool | list[bool] = False
    temperature: float | list[float] = 1.0
    top_k: int = 0
    top_p: float | list[float] = 1.0
    seed: int | list[int] | None = None
    stop_strings: list[str] | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, not {getattr(self, name)!r}")

        def each(value) -> list:
            return list(value) if isinstance(value, (list, tuple)) and value else [value]

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        need(all(type(x) is bool for x in each(self.do_sample)), "do_sample", "true or false (or one per prompt)")
        need(all(number(x) and x > 0 for x in each(self.temperature)), "temperature", "a number above 0 (or one per prompt)")
        need(type(self.top_k) is int and self.top_k >= 0, "top_k", "a whole number >= 0")
        need(all(number(x) and 0 < x <= 1 for x in each(self.top_p)), "top_p", "a number in (0, 1] (or one per prompt)")
        need(self.seed is None or type(self.seed) is int or (isinstance(self.seed, (list, tuple)) and bool(self.seed)
             and all(type(s) is int for s in self.seed)), "seed", "a whole number, a list of them (one per prompt) or None")
        need(self.stop_strings is None or (isinstance(self.stop_strings, (list, tuple)) and all(
            isinstance(s, str) and s for s in self.stop_strings)), "stop_strings", "a list of non-empty strings")
        self.caps({})  # checks max_new_tokens

    def sampling(self, index: int) -> tuple[bool, float, float]:
        """(do_sample, temperature, top_p) for prompt ``index`` (a list gives each prompt its own)."""
        pick = lambda v: v[index] if isinstance(v, (list, tuple)) else v  # noqa: E731
        return pick(self.do_sample), pick(self.temperature), pick(self.top_p)

    @property
    def samples_any(self) -> bool:
        """Whether any prompt is sampled."""
        return any(self.do_sample) if isinstance(self.do_sample, (list, tuple)) else self.do_sample

    def caps(self, defaults: dict[str, int]) -> dict[str, int]:
        """Tokens each mode may decode: this config's caps (one number for every mode, or per mode) over ``defaults``."""
        if self.max_new_tokens is None:
            return dict(defaults)
        given = self.max_new_tokens if isinstance(self.max_new_tokens, dict) else {m: self.max_new_tokens for m in MODES}
        return dict(defaults) | check_token_caps(given)

    @classmethod
    def make(cls, config: "GenerationConfig | None", overrides: dict) -> "GenerationConfig":
        """``config`` (or the defaults) with keyword ``overrides``, as ``generate(**kwargs)`` takes them."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"unknown generation parameters {unknown}; GenerationConfig takes {sorted(known)}")
        if config is not None and not isinstance(config, cls):
            raise ValueError(f"config must be a kvprobe GenerationConfig, not {type(config).__name__}")
        base = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        return cls(**(base | overrides))
