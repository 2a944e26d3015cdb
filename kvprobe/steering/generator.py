"""KVProbeGenerator: a frozen causal LM and its trained probes, steering generation live.

    gen = KVProbeGenerator.from_pretrained("smollm2")     # a shipped alias (checkpoints/) or a folder
    result = gen.generate("What is 17 * 3?", policy="route")    # or "route+verify": answer fast, check, escalate
    best = gen.generate("What is 17 * 3 - 4?", policy="sample", samples=8, select="probe_vote", do_sample=True,
                        temperature=0.7, top_p=0.95, seed=0)   # best.samples, best.answers, best.chosen
    for event in gen.stream(["What is 9 * 8 - 6?"], policy="route+switch"): ...

A policy (``POLICIES``) is a list of hooks on the decode engine (``kvprobe.steering.policies``); the facade builds
it, checks the prompts, and collects the engine's events into one ``GenerationResult`` per prompt.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, Iterator

from kvprobe.models import LoadedModel
from kvprobe.prompts import chat_ids, prompt_ids, with_instruction
from kvprobe.steering import folder
from kvprobe.steering.config import POLICIES, GenerationConfig, SteeringSpec
from kvprobe.steering.engine import DecodeEngine
from kvprobe.steering.events import DoneEvent, Event, GenerationResult
from kvprobe.steering.policies import Confidence, Escalate, FixedMode, GivenModes, OutputScores, Router, Sampler, Switcher
from kvprobe.steering.state import Hook
from kvprobe.tasks import Item

class ContextTooLong(ValueError):
    """A prompt that, with its mode's token cap, runs past the model's positions."""


STEERING_FIELDS = {f.name for f in dataclasses.fields(SteeringSpec)}
LIVE_SOURCES = ("kv", "output")  # what a live correctness probe may read: the answer's KV and/or its output scores


class KVProbeGenerator:
    """A frozen causal LM plus its trained probes (difficulty; correctness, one per answer mode; switch), steering live.

    ``correctness``: one correctness probe or a list of them, each for the mode its card's prompt is in: the
    confidence of an answer comes from the probe of the mode it was written in, and ``verify`` needs a fast one."""

    def __init__(self, lm: LoadedModel, difficulty=None, correctness=None, switch=None, steering: SteeringSpec | None = None):
        correctness = list(correctness.values() if isinstance(correctness, dict) else correctness
                           if isinstance(correctness, (list, tuple)) else [correctness] if correctness is not None else [])
        if difficulty is None and not correctness:
            raise ValueError("a KVProbeGenerator needs at least one probe (difficulty and/or correctness)")
        for kind, probe in [("difficulty", difficulty), ("switch", switch)] + [("correctness", p) for p in correctness]:
            if probe is not None and getattr(probe, "card", None) is None:
                raise ValueError(f"the {kind} probe has no card (its capture's prompt and features): load it with "
                                 "load_probe or from_pretrained, or export it with kvprobe fit")
        self.lm, self.difficulty, self.switch = lm, difficulty, switch
        self.correctness = {}  # answer mode -> correctness probe
        for probe in correctness:
            mode, hp = probe.card.prompt.mode, probe.hparams
            if mode in self.correctness:
                raise ValueError(f"two correctness probes for {mode} answers; give one per mode")
            if hp.source not in LIVE_SOURCES or hp.coe_features or hp.get("length_inputs"):
                raise ValueError(f"live correctness needs a probe on the answer's KV and/or output scores (source one of "
                                 f"{LIVE_SOURCES}, coe_features and length_inputs false), not source={hp.source!r} "
                                 f"coe_features={hp.coe_features} length_inputs={hp.get('length_inputs')}")
            self.correctness[mode] = probe
        self.path: Path | None = None  # the folder from_pretrained loaded
        self.steering = self._steering(steering or SteeringSpec())
        main = (difficulty or correctness[0]).card  # prompts and caps come from the capture the main probe learned on
        self.prompt = copy.deepcopy(main.prompt)
        self.max_new_tokens = dict(main.generation.max_new_tokens)
        self.route_on = main.route_on
        self.window_layers = main.features.layer_ids(lm.shape.layers)
        self.check_thresholds(self.steering)
        self.switch_window = switch.card.window if switch is not None else 0
        for probe in (difficulty, switch, *correctness):  # probes read the cache where the model's inputs live
            if probe is not None:
                probe.to(lm.input_device)
        self._live_switch = switch.live(self.switch_window).to(lm.input_device) if switch is not None else None

    def check_thresholds(self, spec: SteeringSpec) -> None:
        """Threshold names must be among the difficulty probe's calibrated ones (checked at construction and per call)."""
        for name in ("threshold", "verify_route_threshold"):
            threshold = getattr(spec, name)
            if self.difficulty is not None and isinstance(threshold, str) and threshold not in self.difficulty.thresholds:
                raise ValueError(f"{name} {threshold!r} is neither a number nor among the probe's calibrated thresholds "
                                 f"{sorted(self.difficulty.thresholds)}")

    def _steering(self, spec: SteeringSpec) -> SteeringSpec:
        """``spec`` with its unset switch settings taken from the switch probe's export (calibrated on validation)."""
        if not isinstance(spec, SteeringSpec):
            raise ValueError(f"steering must be a kvprobe SteeringSpec (kvprobe.steering.SteeringSpec(...)), not {spec!r:.80}; "
                             "a policy is chosen per call: generate(..., policy='fast')")
        spec = copy.deepcopy(spec)
        if self.switch is not None:
            hp, calibrated = self.switch.hparams, self.switch.thresholds
            spec.switch_low = calibrated["switch_low"] if spec.switch_low is None else spec.switch_low
            spec.switch_high = calibrated["switch_high"] if spec.switch_high is None else spec.switch_high
            spec.probe_every = hp.probe_every if spec.probe_every is None else spec.probe_every
            spec.min_tokens = hp.min_tokens if spec.min_tokens is None else spec.min_tokens
        return spec

    # --- loading and saving (kvprobe.steering.folder) -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, model=None, tokenizer=None, device_map: str | None = None,
                        dtype: str | None = None, steering: SteeringSpec | None = None) -> "KVProbeGenerator":
        """Probes from a generator folder (``generator.json`` + ``difficulty/`` + ``correctness/``), a single exported
        probe folder, or a shipped alias (``kvprobe.resources.aliases()``: ``smollm2``, ``qwen2.5-coder-0.5b``); the
        base model they record, or ``model`` (a kvprobe ``LoadedModel``, or a transformers model with its
        ``tokenizer``), checked to match. ``.path`` says which folder was loaded."""
        where, lm, probes, saved = folder.load(path, model, tokenizer, device_map, dtype)
        gen = cls._of(lm, probes, steering or saved)
        gen.path = where
        return gen

    @classmethod
    def from_probes(cls, lm: LoadedModel, difficulty: str | Path | None = None,
                    correctness: str | Path | list[str | Path] | None = None, switch: str | Path | None = None,
                    steering: SteeringSpec | None = None) -> "KVProbeGenerator":
        """Assemble a generator from exported probe folders (``kvprobe fit`` outputs); ``correctness``: one folder or
        a list of them (one per answer mode)."""
        correctness = correctness if isinstance(correctness, (list, tuple)) else [correctness]
        return cls._of(lm, folder.load_probes(lm, [difficulty, switch, *correctness]), steering)

    @classmethod
    def _of(cls, lm: LoadedModel, probes: dict, steering) -> "KVProbeGenerator":
        """A generator of probes by slot (``folder.SLOTS``)."""
        correctness = [p for name, p in probes.items() if name.startswith("correctness")]
        return cls(lm, probes.get("difficulty"), correctness, probes.get("switch"), steering)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the generator folder whole: it appears complete or not at all (an older one stays until then)."""
        probes = [p for p in (self.difficulty, *self.correctness.values(), self.switch) if p is not None]
        return folder.save(path, {folder.slot(p.card): p for p in probes}, self.steering)

    # --- prompts ------------------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt, mode: str) -> list[int]:
        """Token ids of ``prompt`` (a question string, an ``Item`` or a chat message list) in ``mode``."""
        spec = copy.deepcopy(self.prompt)
        spec.mode = mode
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("a prompt is empty (or only whitespace): there is no question to answer")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"the prompt holds a lone surrogate at character {err.start} ({prompt[err.start]!r}), "
                                 "which is not valid text; fix that character") from None
            prompt = Item("live", prompt, "")
        if isinstance(prompt, Item):
            return prompt_ids(prompt, spec, self.lm.tokenizer)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return chat_ids(with_instruction(prompt, spec, self.lm.tokenizer), spec, self.lm.tokenizer)
        raise ValueError(f"a prompt is a string, a kvprobe Item or a list of chat messages, not {type(prompt).__name__}")

    # --- generation ---------------------------------------------------------------------------------------------------
    def generate(self, prompts, policy: str | None = None, config: GenerationConfig | None = None, *,
                 oracle_modes: list[str] | None = None, hooks: list[Hook] | None = None, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Answer under ``policy`` (``None``: the steering's, saved with the folder; ``route`` by default): one prompt (a string, an ``Item``, a chat) -> its ``GenerationResult``; a list of
        prompts -> a list of them. Decoding follows ``config`` and keyword overrides of its fields
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_strings``); keyword
        overrides of ``SteeringSpec`` fields (``samples``, ``select``, ``stop_at``, ``escalate_above``, ...) steer
        this call only; ``hooks`` run after the policy's (``kvprobe.steering.state.Hook``)."""
        single = _is_single(prompts)
        results: dict[int, GenerationResult] = {}
        for event in self.stream([prompts] if single else prompts, policy, config, oracle_modes=oracle_modes,
                                 hooks=hooks, **kwargs):
            if isinstance(event, DoneEvent):
                results[event.row] = event.result
        out = [results[i] for i in range(len(results))]
        return out[0] if single else out

    def stream(self, prompts, policy: str | None = None, config: GenerationConfig | None = None, *,
               oracle_modes: list[str] | None = None, hooks: list[Hook] | None = None,
               admit: Callable[[], list] | None = None, **kwargs) -> Iterator[Event]:
        """``generate``'s work as typed events (``kvprobe.steering.events``: route, text, switch, done), each naming
        its prompt (``row``), as they happen. The arguments are checked before the first event. ``admit``: the
        batch is open (``DecodeEngine.run_open``, continuous batching): the prompts it returns between steps join
        it, each row finishing on its own (the caller checks them, e.g. with a ``stream`` call of their own)."""
        batch = [prompts] if _is_single(prompts) else prompts
        if not isinstance(batch, (list, tuple)) or not batch:
            raise ValueError(f"prompts: a string, a kvprobe Item, a chat (list of messages) or a non-empty list of these, not {prompts!r:.80}")
        batch = list(batch)
        steering = {k: kwargs.pop(k) for k in list(kwargs) if k in STEERING_FIELDS}
        if steering:  # the same checks as the constructor's, before any model work
            steering = dataclasses.replace(self.steering, **steering)
            self.check_thresholds(steering)
        else:
            steering = self.steering
        policy = steering.policy if policy is None else policy
        engine = self.engine(self.hooks(policy, len(batch), oracle_modes, steering) + list(hooks or []), config, **kwargs)
        if policy == "sample" and not engine.config.samples_any:
            raise ValueError("policy 'sample' draws several answers: it needs do_sample=True (greedy ones would all be "
                             "the same)")
        self._check_context(batch, policy, engine.caps, oracle_modes)
        if admit is not None:
            if policy in ("sample", "oracle"):
                raise ValueError(f"policy {policy!r} cannot run as an open batch (its prompts finish together or need "
                                 "given modes)")
            return engine.run_open(batch, admit)
        return engine.run(batch)

    def engine(self, hooks: list[Hook], config: GenerationConfig | None = None, **kwargs) -> DecodeEngine:
        """A decode engine on this generator's model and prompts running ``hooks``: a policy of one's own is a list
        of hooks (``kvprobe.steering.state.Hook``), e.g. ``gen.engine(gen.hooks("route", n) + [MyHook()]).run(prompts)``."""
        config = GenerationConfig.make(config, kwargs)
        return DecodeEngine(self.lm, self.prompt_ids, hooks, config, config.caps(self.max_new_tokens))

    def hooks(self, policy: str, n: int, oracle_modes: list[str] | None = None,
              steering: SteeringSpec | None = None) -> list[Hook]:
        """The hooks that make up ``policy`` for ``n`` prompts (plus ``Confidence`` when there are correctness probes),
        steered by ``steering`` (default: the generator's)."""
        s = steering or self.steering
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
        probe_rule = s.select in ("probe_vote", "probe_best") or (s.stop_on == "margin" and s.stop_at is not None)
        if policy == "sample" and probe_rule and "slow" not in self.correctness:
            raise ValueError(f"policy 'sample' with select {s.select!r} / stop_on {s.stop_on!r} needs a correctness probe "
                             "trained on slow answers (this generator has none): use select 'vote' or add one")
        if policy.endswith("verify") and "fast" not in self.correctness:
            raise ValueError(f"policy {policy!r} needs a correctness probe trained on fast answers (kvprobe fit --config "
                             "configs/verifier.yaml, then kvprobe assemble ... --correctness_fast <folder>)")
        if policy.endswith("verify") and s.escalate_on == "gain" and (
                self.difficulty is None or self.difficulty.hparams.objective != "ce"):
            raise ValueError(f"policy {policy!r} with escalate_on 'gain' needs a four-class (objective 'ce') difficulty probe")
        if policy.startswith("route") and self.difficulty is None:
            raise ValueError(f"policy {policy!r} needs a difficulty probe; this generator has only a correctness probe")
        if policy == "route+switch" and self.switch is None:
            raise ValueError("policy 'route+switch' needs a switch probe (kvprobe fit --config configs/switch.yaml, "
                             "then kvprobe assemble ... --switch <folder>)")
        if policy == "oracle" and (not isinstance(oracle_modes, (list, tuple)) or len(oracle_modes) != n
                                   or any(m not in ("fast", "slow") for m in oracle_modes)):
            raise ValueError(f"policy 'oracle' needs oracle_modes: one 'fast'/'slow' per prompt, not {oracle_modes!r}")
        hooks: list[Hook] = {"fast": lambda: [FixedMode("fast")], "slow": lambda: [FixedMode("slow")],
                             "oracle": lambda: [GivenModes(oracle_modes)], "route": lambda: [self.router(s.threshold)],
                             "route+switch": lambda: [self.router(s.threshold), Switcher(self._live_switch, self.switch_window, s)],
                             # escalating on gain needs the router's P(slow right | fast wrong); it routes nothing
                             "verify": lambda: [self.router(float("inf"), helps=True) if s.escalate_on == "gain" else FixedMode("fast")],
                             "route+verify": lambda: [self.router(s.threshold if s.verify_route_threshold is None else s.verify_route_threshold,
                                                                 helps=s.escalate_on == "gain")],
                             "sample": lambda: []}[policy]()
        reads_output = any(p.hparams.source == "output" or p.hparams.get("output_inputs") for p in self.correctness.values())
        if reads_output or (policy == "sample" and s.select in ("confidence_vote", "max_prob_best")):
            hooks.append(OutputScores())
        if self.correctness:
            hooks.append(Confidence(self.correctness))  # before Escalate and Sampler, which read the confidence it sets
        if policy.endswith("verify"):
            hooks.append(Escalate(s.escalate_above, s.escalate_on))
        return hooks + ([Sampler(s)] if policy == "sample" else [])

    def router(self, threshold: str | float | None = None, helps: bool = False) -> Router:
        """The router at ``threshold`` (a calibrated name or a number; ``None`` = the steering's ``threshold``);
        ``helps``: it also gives each row P(slow right | fast wrong)."""
        threshold = self.steering.threshold if threshold is None else threshold
        if not isinstance(threshold, (int, float)):
            threshold = self.difficulty.thresholds[threshold]["threshold"]
        return Router(self.difficulty, float(threshold), self.route_on, self.window_layers, helps)

    def _check_context(self, batch: list, policy: str, caps: dict[str, int], oracle_modes) -> None:
        """Refuse a prompt that, with its mode's token cap, would run past the model's positions (the model would
        decode garbage there, with a confident score)."""
        limit = self.lm.shape.max_positions
        for i, prompt in enumerate(batch):
            modes = ([oracle_modes[i]] if policy == "oracle" else [policy] if policy in ("fast", "slow")
                     else ["slow"] if policy == "sample" else ["fast", "slow"])
            for mode in modes:
                n = len(self.prompt_ids(prompt, mode))
                if limit and n + caps[mode] > limit:
                    raise ContextTooLong(f"prompt {i} is {n} tokens in {mode} mode; with max_new_tokens {caps[mode]} that is more "
                                     f"than the model's {limit} positions: shorten it or lower max_new_tokens")


def _is_single(prompts) -> bool:
    """One prompt: a string, an Item, or a chat (a non-empty list of message dicts)."""
    return isinstance(prompts, (str, Item)) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict))
