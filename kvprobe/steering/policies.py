"""The live probes as decode-loop hooks (``kvprobe.steering.state.Hook``). A policy is a list of them:

- ``fast`` / ``slow``: ``FixedMode``; ``oracle``: ``GivenModes`` (the modes per prompt, for evaluation on labels);
- ``route``: ``Router``: prefill the ``route_on`` prompt, score its last ``window`` positions from the cache
  (``features.window_kv``, the function capture used), pick a mode; a question routed to the other mode keeps the
  cached KV of the prompt prefix both modes share and prefills only the differing instruction (the engine's
  ``reprompt``);
- ``route+switch``: ``Router`` and ``Switcher``: while a slow answer decodes, the switch probe scores the latest
  ``window`` positions every ``probe_every`` tokens ("keep thinking?"). Once the score has risen above
  ``switch_high`` (armed) and then falls below ``switch_low``, the answer cue is appended and the model answers
  (slow -> fast). At most one switch; decoding continues from the same cache and token ids, with no
  decode-to-text and re-prefill (the decoded token and the cue are fed as the text would tokenise, ``cue_block``,
  one token per step so that no other row of the batch is padded inside its sequence). The probe's input is the
  window of per-position layer-averaged K and/or V (what capture stores as the ``token_kv`` trajectory); each
  position is projected by the probe's first layer as it is fed (``LiveSwitch``), so the upkeep is one column per
  layer and a call sums ``window`` small vectors.
- every policy, when the generator has correctness probes: ``Confidence``: the per-layer K and V pooled over the
  answer's positions, read from the cache once when the answer ends (and, for a probe that reads them, the mean
  max-probability and entropy of the answer's tokens, kept by ``OutputScores``), give a calibrated P(correct) from
  the probe of the mode the answer was written in (one per mode: a probe trained on slow answers knows little about
  direct ones);
- ``verify``: answer fast; ``Escalate``: a fast answer whose escalation score (1 - P(correct), or that times
  P(slow right | fast wrong): ``escalate_on``) is above ``escalate_above`` is answered again in slow mode: the
  cache is cropped to the prompt prefix both modes share (the fast answer's positions are dropped, never
  re-encoded) and only the rest of the slow prompt is prefilled (``Row.reopen``);
- ``route+verify``: ``Router`` (at ``verify_route_threshold``) sends clearly hard questions straight to slow mode,
  the rest go through ``verify``.
- ``sample``: ``Sampler``: each prompt is prefilled once and its cache expanded to one row per sample (sample ``j``
  seeded with the prompt's seed + ``j``); the samples decode as one batch, ``Confidence`` scores each from its own
  cache, and the grader's answer classes and the ``select`` rule (``kvprobe.sampling``) pick the answer. With early
  stopping the samples come in waves of ``wave``: after each, a prompt whose table is ``settled`` is done, the others
  are answered again from the cropped prompt cache (only its last position is fed again).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from kvprobe.cache import layer_kv, newest_kv
from kvprobe.cascade import escalation
from kvprobe.features import pooled_positions, step_stats, window_kv
from kvprobe.steering.config import SteeringSpec
from kvprobe.sampling import VoteTable, answer_classes, settled
from kvprobe.steering.events import DoneEvent, EscalateEvent, RouteEvent, Sample, SwitchEvent
from kvprobe.tasks import Item
from kvprobe.steering.state import DecodeState, Hook, timed


class FixedMode(Hook):
    """Every prompt in one mode."""

    def __init__(self, mode: str):
        self.mode = mode

    def start_modes(self, prompts: list) -> list[str]:
        return [self.mode] * len(prompts)


class GivenModes(Hook):
    """The mode of each prompt, given (e.g. the labels' oracle)."""

    def __init__(self, modes: list[str]):
        self.modes = list(modes)

    def start_modes(self, prompts: list) -> list[str]:
        return self.modes


class Copies(Hook):
    """Prompt i answered ``counts[i]`` times (OpenAI's ``n``) from one prefill: after the other hooks have routed the
    prompts, each row is expanded into its copies (``DecodeState.expand``; copy ``j`` is ``Row.sample`` j, seeded
    with the prompt's seed + j), and each copy finishes with its own ``DoneEvent``. Put it after the policy's hooks."""

    def __init__(self, counts: list[int]):
        self.counts = list(counts)

    def on_prefill(self, engine, state: DecodeState) -> None:
        state.expand([self.counts[r.index] for r in state.rows])


class Router(Hook):
    """Scores the difficulty of each prompt from its ``route_on`` prompt's cached window; above ``threshold``: slow.
    With ``helps``, also P(slow right | fast wrong) per row (``Row.slow_helps``, a four-class probe's)."""

    def __init__(self, probe, threshold: float, route_on: str, window_layers: list[int], helps: bool = False):
        self.probe, self.threshold, self.route_on, self.window_layers = probe, threshold, route_on, window_layers
        self.helps = helps

    def start_modes(self, prompts: list) -> list[str]:
        return [self.route_on] * len(prompts)

    def window(self, engine, state: DecodeState) -> dict[str, torch.Tensor]:
        """Each row's last ``window`` real positions in the capture's ``prompt_kv`` layout (fp16, as stored)."""
        pairs = layer_kv(state.cache, device=engine.lm.input_device)
        return {"prompt_kv": window_kv(pairs, state.mask, self.probe.hparams.window, self.window_layers).half()}

    def scores(self, engine, state: DecodeState) -> torch.Tensor:
        """Difficulty scores from each row's cached window, as capture stored it."""
        return self.probe.predict(self.window(engine, state)).cpu()

    def on_prefill(self, engine, state: DecodeState) -> Iterator[RouteEvent]:
        with timed(state.rows):
            batch = self.window(engine, state)
            scores = self.probe.predict(batch).cpu().tolist()
            if self.helps:
                for r, p in zip(state.rows, self.probe.slow_helps(batch).cpu().tolist()):
                    r.slow_helps = p
        for r, score in zip(state.rows, scores):
            r.route_score = score
            r.mode = "slow" if score > self.threshold else "fast"
            yield RouteEvent(r.index, r.mode, score, self.threshold)


class Switcher(Hook):
    """Cuts a slow answer's reasoning once the switch probe says it is settled (see the module docstring)."""

    KEY = "switch_window"  # the ring buffer of each row's latest projected positions, in ``DecodeState.row_tensors``

    def __init__(self, live, window: int, steering: SteeringSpec):
        self.live, self.window, self.steering = live, window, steering
        self.armed: set[int] = set()  # rows (by prompt index) whose score has risen above switch_high

    def on_forward(self, engine, state: DecodeState, blocks: list[list[int]], fed: list[bool]) -> None:
        """Push the newly fed position into each row's ring buffer: its layer-averaged K and/or V (a ``token_kv``
        trajectory entry, fp16 like the stored one) projected by the probe's first layer. Of a prompt only its last
        position counts (it emits the first answer token). One column of every layer per step."""
        with timed([r for r, f in zip(state.rows, fed) if f]):
            position = newest_kv(state.cache, engine.lm.input_device, self.live.kv).float().mean(1).half().float()
            projected = self.live.project(position)  # (batch, hidden)
            recent = state.row_tensors.get(self.KEY)
            if recent is None:
                recent = projected.new_zeros((projected.shape[0], self.window, projected.shape[1]))
            shifted = torch.cat([recent[:, 1:], projected[:, None]], 1)
            if not all(fed):
                shifted = torch.where(torch.tensor(fed, device=shifted.device).view(-1, 1, 1), shifted, recent)
            state.row_tensors[self.KEY] = shifted

    def scores(self, state: DecodeState, rows: list[int]) -> list[float]:
        """The switch probe's scores of the given rows' live windows."""
        recent = state.row_tensors[self.KEY]
        return self.live.scores((recent if len(rows) == len(recent) else recent[rows]).sum(1))

    def on_token(self, engine, state: DecodeState, blocks: list[list[int]]) -> Iterator:
        """Score every slow row due for a probe; arm above ``switch_high``, switch the armed ones below
        ``switch_low``: the answer cue follows, one token per step."""
        s = self.steering
        due = [j for j, r in enumerate(state.rows) if not r.done and r.switched_at is None and r.mode == "slow"
               and r.in_mode >= s.min_tokens and r.in_mode % s.probe_every == 0]
        if not due:
            return
        with timed([state.rows[j] for j in due]):
            scores = self.scores(state, due)
        for j, score in zip(due, scores):
            r = state.rows[j]
            r.switch_trace.append((r.in_mode, score))
            if r.index not in self.armed:
                if score > s.switch_high:
                    self.armed.add(r.index)
                continue
            if score >= s.switch_low:
                continue
            r.switched_at, r.switch_score = r.tokens["fast"] + r.tokens["slow"], score
            r.mode, r.in_mode = "fast", 0
            block = cue_block(engine.lm.tokenizer, r.ids[-4:], blocks[j][0], s.answer_cue)
            blocks[j], r.forced = block[:1], block[1:]
            r.out[-1:] = block  # the decoded token, possibly merged with the cue's first characters
            r.cue += len(block) - 1
            yield SwitchEvent(r.index, r.switched_at, score, "fast")
            yield from engine.refresh_text(r)


class OutputScores(Hook):
    """Keeps each answer's per-token max-probability and entropy (``features.step_stats``, the function capture's
    ``OutputStats`` uses) for the correctness probes that read them."""

    def on_token(self, engine, state: DecodeState, blocks: list[list[int]]) -> None:
        picked = [j for j, p in enumerate(state.picked) if p]
        if not picked:
            return
        with timed([state.rows[j] for j in picked]):
            max_prob, entropy = step_stats(state.logits[picked])
            for j, m, e in zip(picked, max_prob.tolist(), entropy.tolist()):
                state.rows[j].step_stats.append((m, e))


class Confidence(Hook):
    """P(correct) of each answer from the probe of the mode it was written in (``probes``: mode -> probe; a row
    without one keeps ``None``): its per-layer K and V averaged over the answer's positions (the last prompt position,
    then every fed answer or cue token: what capture stores), read from the cache once, at the end, and the answer's
    mean max-probability and entropy where the probe reads them."""

    def __init__(self, probes: dict):
        self.probes = probes

    def on_finish(self, engine, state: DecodeState) -> None:
        with timed(state.rows):
            start = min(state.answer_from)  # rows merged from other prefills begin their answers further right
            answer = state.mask[:, start:].clone()
            for i, a in enumerate(state.answer_from):
                answer[i, :a - start] = 0
            pooled = pooled_positions(layer_kv(state.cache, device=engine.lm.input_device), answer, start)
            for mode, probe in self.probes.items():
                where = [j for j, r in enumerate(state.rows) if r.answer_mode == mode]
                if not where:
                    continue
                stats = torch.tensor([_mean(state.rows[j].step_stats) for j in where], dtype=torch.float32)
                batch = {"response_kv": pooled[where], "scores": {"max_prob": stats[:, 0], "neg_entropy": -stats[:, 1]}}
                for j, p in zip(where, probe.predict(batch).tolist()):
                    state.rows[j].confidence = p


def _mean(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The mean (max-prob, entropy) over an answer's tokens (NaN for none)."""
    n = len(pairs)
    return (sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n) if n else (float("nan"), float("nan"))


class Escalate(Hook):
    """``verify``: a finished fast answer whose escalation score (``kvprobe.cascade.escalation`` of its confidence,
    set by ``Confidence`` before this hook, and for ``gain`` the router's ``slow_helps``) is above ``threshold`` is
    answered again in slow mode, once."""

    def __init__(self, threshold: float, rule: str = "wrong"):
        self.threshold, self.rule = threshold, rule

    def on_finish(self, engine, state: DecodeState) -> Iterator[EscalateEvent]:
        for r in state.rows:
            if r.answer_mode != "fast" or r.escalated or r.confidence is None:
                continue
            helps = None if r.slow_helps is None else torch.tensor([r.slow_helps])
            r.verify_score = float(escalation(self.rule, torch.tensor([r.confidence]), helps)[0])
            if r.verify_score > self.threshold:
                dropped = r.text
                r.escalated = True
                r.reopen("slow")
                yield EscalateEvent(r.index, r.verify_score, self.threshold, dropped)


class Sampler(Hook):
    """``sample``: ``SteeringSpec.samples`` answers per prompt in ``mode`` from one prefill, in waves when early
    stopping; each prompt's ``DoneEvent`` carries its samples, answer classes and the chosen one (see the module
    docstring). Runs after ``Confidence``, whose scores it reads."""

    def __init__(self, steering: SteeringSpec, mode: str = "slow"):
        self.s, self.mode = steering, mode
        self.wave = min(steering.wave, steering.samples) if steering.early_stop else steering.samples
        self.rows: dict[int, list] = {}  # prompt index -> its rows (a row answers one sample per wave)
        self.drawn: dict[int, list[tuple[Sample, list[int]]]] = {}  # prompt index -> its samples and their token ids
        self.answers: dict[int, list[str]] = {}  # prompt index -> its answer classes so far

    def start_modes(self, prompts: list) -> list[str]:
        return [self.mode] * len(prompts)

    def on_prefill(self, engine, state: DecodeState) -> None:
        state.expand(self.wave)
        for r in state.rows:
            self.rows.setdefault(r.index, []).append(r)

    def on_finish(self, engine, state: DecodeState) -> Iterator[DoneEvent]:
        for index in dict.fromkeys(r.index for r in state.rows):
            rows = [r for r in state.rows if r.index == index]
            prompt = engine.prompts[index]
            item = prompt if isinstance(prompt, Item) else Item("live", prompt if isinstance(prompt, str) else "", "")
            # only this wave's samples are graded: earlier ones keep their classes, which are numbered by appearance
            classes, self.answers[index] = answer_classes(item, [r.text for r in rows], self.answers.get(index))
            drawn = self.drawn.setdefault(index, [])
            drawn += [(Sample(r.text, len(r.out), r.confidence, _mean(r.step_stats)[0] if r.step_stats else None, k),
                       list(r.out)) for r, k in zip(rows, classes)]
            samples = [d[0] for d in drawn]
            table = VoteTable([x.answer for x in samples], [x.confidence or 0.0 for x in samples],
                              [x.mean_max_prob if x.mean_max_prob is not None else 0.0 for x in samples], [False] * len(samples))
            left = self.s.samples - len(drawn)
            if left > 0 and not settled(table, self.s.stop_on, self.s.stop_at or 0.0, self.wave):
                for r in rows[: min(left, len(rows))]:
                    r.reopen(self.mode)
                    r.sample += len(rows)
                for r in rows[left:]:
                    r.reported = True  # not needed for the last wave
                continue
            for r in rows:
                r.reported = True
            yield DoneEvent(index, self.result(index, table))

    def result(self, index: int, table: VoteTable):
        """One result for the prompt (its vote ``table``, grades unknown live): the chosen class's most confident
        sample's text and P(correct), every sample's tokens and prefill."""
        drawn, rows = self.drawn[index], self.rows[index]
        chosen = table.choose(self.s.select, self.s.eta)
        members = [i for i, k in enumerate(table.classes) if k == chosen] if chosen is not None else [0]
        best = max(members, key=lambda i: (table.probe[i], -i))
        lead = rows[0].result()
        return dataclasses.replace(
            lead, text=drawn[best][0].text, confidence=drawn[best][0].confidence, token_ids=drawn[best][1],
            tokens={m: sum(r.tokens[m] for r in rows) for m in lead.tokens}, prompt_tokens=sum(r.prompt_tokens for r in rows),
            reprompt_tokens=sum(r.reprompt_tokens for r in rows), probe_seconds=sum(r.probe_seconds for r in rows),
            samples=[d[0] for d in drawn], answers=self.answers[index], chosen=chosen)


def cue_block(tokenizer, fed: list[int], token: int, cue: str) -> list[int]:
    """What to feed at a switch: the just-decoded ``token`` (not yet in the cache) and the answer cue, tokenised as
    the text would be. Appending the cue's own ids can leave a sequence no tokenizer produces (" " + "\\n" + "\\n"
    where the text " \\n\\n" tokenises as " \\n" + "\\n"), and the model then continues as after no real text;
    re-tokenising the last few ``fed`` tokens with the token and the cue gives the ids a fresh prefill of the
    switched text would have. Used when it leaves the fed tokens as they are (the cache holds them); otherwise
    the token and the cue's ids."""
    ids = tokenizer.encode(tokenizer.decode(fed + [token], skip_special_tokens=False) + cue, add_special_tokens=False)
    if ids[: len(fed)] == fed and len(ids) > len(fed):
        return ids[len(fed):]
    return [token] + tokenizer.encode(cue, add_special_tokens=False)
