"""KVProbeGenerator: trained probes steer generation live, from the very KV cache the decode loop builds.

    gen = KVProbeGenerator.from_pretrained("smollm2")     # a shipped alias (kvprobe/pretrained/) or a folder
    answer, record = gen.generate("What is 17 * 3?", policy="route")

The loop is our own greedy decode over a ``DynamicCache``, so the probes run between steps:

- ``route``: prefill the ``route_on`` prompt (fast by default), read its last ``window`` positions from the cache
  (``features.window_kv``, the function capture used), score difficulty, pick a mode. A question routed to the other
  mode keeps the cached KV of the prompt prefix both modes share and prefills only the differing instruction.
- ``route+switch``: as ``route``; then, while a slow answer decodes, the switch probe scores the latest ``window``
  positions every ``probe_every`` tokens ("keep thinking?"). Once the score has risen above ``switch_high`` (armed)
  and then falls below ``switch_low`` (the result is written), the answer cue is appended and the model answers
  (slow -> fast). At most one switch; decoding continues from the same cache and token ids, with no
  decode-to-text and re-prefill (the decoded token and the cue are fed as the text would tokenise, ``cue_block``,
  one token per step so that no other row of the batch is padded inside its sequence).
  The switch probe's input is the window of per-position layer-averaged K (and/or V: what capture stores as the
  ``token_kv`` trajectory); each position is projected by the probe's first layer as it is fed
  (``LiveSwitch``), so the upkeep is one column per layer and a call sums ``window`` small vectors.
- ``fast``/``slow``: a fixed mode; ``oracle``: the modes given per prompt (evaluation on labelled data).

The correctness probe (when present) reads the per-layer K and V pooled over the answer's positions, read from the
cache once when the answer ends (nothing per token), and gives every answer a confidence. Fast answers are
a few tokens here and are never switched.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

import kvprobe
from kvprobe import features as F
from kvprobe.cache import cache_argument, layer_kv, newest_kv
from kvprobe.export import PROBE_KINDS, ProbeMismatch, load_probe, read_config, replace_folder, write_probe
from kvprobe.features import FeatureSpec
from kvprobe.models import LoadedModel, ModelSpec, last_logits_only, load_model, model_shape, resolve
from kvprobe.prompts import PromptSpec, chat_ids, check_token_caps, prompt_ids, with_instruction
from kvprobe.resources import resolve_generator
from kvprobe.tasks import Item

POLICIES = ("fast", "slow", "route", "route+switch", "oracle")
GENERATOR_FILE = "generator.json"


@dataclass
class SteeringSpec:
    """How a generator steers; saved in ``generator.json`` beside its probes.

    Args:
        threshold: which calibrated threshold of the difficulty probe routes before decoding (see its export).
        switch_low: ``route+switch``: an armed slow answer whose switch score drops below this stops reasoning;
            ``None`` = the switch probe's calibrated value.
        switch_high: the switch arms once the score has risen above this (hysteresis); ``None`` = the probe's.
        probe_every: score the live window every this many decoded tokens; ``None`` = what the switch probe was
            calibrated for.
        min_tokens: no switch before this many decoded tokens; ``None`` = the switch probe's.
        answer_cue: appended to switch slow -> fast (prompt-based modes; for hybrid thinking models use the
            template's end-of-thinking text, e.g. ``</think>``).
    """

    threshold: str = "best_at_0.5x_slow"
    switch_low: float | None = None
    switch_high: float | None = None
    probe_every: int | None = None
    min_tokens: int | None = None
    answer_cue: str = "\n\nAnswer:"


@dataclass
class GenerationResult:
    """What happened for one prompt. ``tokens`` counts every decoded token per mode (the token decoded at a
    switch counts in the mode that decoded it); cue tokens are forced, not decoded, and counted apart: the ids fed at
    the switch beyond the decoded token (``cue_block``: the decoded token and the cue, tokenised as text)."""

    text: str
    mode: str  # chosen before decoding
    final_mode: str
    route_score: float | None
    switched_at: int | None  # decoded tokens before the switch
    switch_score: float | None
    tokens: dict[str, int]
    cue_tokens: int
    prompt_tokens: int  # prompt positions prefilled (both modes' shared prefix counted once)
    confidence: float | None  # calibrated P(correct) from the correctness probe
    seconds: float
    probe_seconds: float
    token_ids: list[int] = field(repr=False, default_factory=list)
    switch_trace: list[tuple[int, float]] = field(repr=False, default_factory=list)  # (decoded tokens, switch score)

    @property
    def decoded_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclass
class _Row:
    index: int
    ids: list[int]  # every position fed so far, prompt included
    mode: str
    route_score: float | None = None
    prompt_tokens: int = 0
    out: list[int] = field(default_factory=list)  # decoded and cue tokens, in order
    tokens: dict[str, int] = field(default_factory=lambda: {"fast": 0, "slow": 0})
    in_mode: int = 0
    cue: int = 0
    switched_at: int | None = None
    switch_score: float | None = None
    armed: bool = False
    forced: list[int] = field(default_factory=list)  # the rest of a switch's cue, fed one per step
    trace: list[tuple[int, float]] = field(default_factory=list)
    chosen: str = ""  # the mode decoding started in
    done: bool = False
    t0: float = 0.0
    probe_seconds: float = 0.0


class KVProbeGenerator:
    """A frozen causal LM plus its trained probes (difficulty; optionally correctness and switch), steering live."""

    def __init__(self, lm: LoadedModel, difficulty=None, correctness=None, configs: dict | None = None,
                 steering: SteeringSpec | None = None, switch=None):
        if difficulty is None and correctness is None:
            raise ValueError("a KVProbeGenerator needs at least one probe (difficulty and/or correctness)")
        self.lm, self.difficulty, self.correctness, self.switch = lm, difficulty, correctness, switch
        self.configs = configs or {}
        self.path: Path | None = None  # the folder from_pretrained loaded
        self.steering = self._steering(steering or SteeringSpec())
        main = self.configs.get("difficulty") or self.configs["correctness"]
        self.prompt = PromptSpec(**main["prompt"])
        self.max_new_tokens = dict(main["generation"]["max_new_tokens"])
        self.route_on = main.get("difficulty", {}).get("route_on", "fast")
        self.window_layers = FeatureSpec(**main["features"]).layer_ids(lm.shape.layers)
        if correctness is not None and (correctness.hparams.source != "kv" or correctness.hparams.coe_features
                                        or correctness.hparams.get("length_inputs")):
            raise ValueError("live correctness needs a probe on the answer's KV alone (source 'kv', coe_features and "
                             f"length_inputs false), not source={correctness.hparams.source!r} "
                             f"coe_features={correctness.hparams.coe_features} length_inputs={correctness.hparams.get('length_inputs')}")
        if difficulty is not None and self.steering.threshold not in difficulty.thresholds:
            raise ValueError(f"threshold {self.steering.threshold!r} is not among the probe's calibrated thresholds "
                             f"{sorted(difficulty.thresholds)}")
        self.switch_window = self.configs["switch"]["switch"]["window"] if switch is not None else 0
        for probe in (difficulty, correctness, switch):  # probes read the cache where the model's inputs live
            if probe is not None:
                probe.to(lm.input_device)
        self._live_switch = switch.live(self.switch_window).to(lm.input_device) if switch is not None else None

    def _steering(self, spec: SteeringSpec) -> SteeringSpec:
        """``spec`` with its unset switch settings taken from the switch probe's export (calibrated on validation)."""
        spec = copy.deepcopy(spec)
        if self.switch is not None:
            hp, calibrated = self.switch.hparams, self.switch.thresholds
            spec.switch_low = calibrated["switch_low"] if spec.switch_low is None else spec.switch_low
            spec.switch_high = calibrated["switch_high"] if spec.switch_high is None else spec.switch_high
            spec.probe_every = hp.probe_every if spec.probe_every is None else spec.probe_every
            spec.min_tokens = hp.min_tokens if spec.min_tokens is None else spec.min_tokens
        return spec

    # --- loading and saving -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, model=None, tokenizer=None, device_map: str | None = None,
                        dtype: str | None = None, steering: SteeringSpec | None = None) -> "KVProbeGenerator":
        """Probes from a generator folder (``generator.json`` + ``difficulty/`` + ``correctness/``), a single exported
        probe folder, or a shipped alias (``kvprobe.resources.aliases()``: ``smollm2``, ``qwen2.5-coder-0.5b``); the
        base model they record, or ``model`` (a kvprobe ``LoadedModel``, or a transformers model with its
        ``tokenizer``), checked to match. ``.path`` says which folder was loaded."""
        folder = resolve_generator(path)
        if (folder / GENERATOR_FILE).is_file():
            meta = _read_generator(folder / GENERATOR_FILE)
            probes = {name: folder / sub for name, sub in meta["probes"].items()}
            steering = steering or _steering_spec(meta.get("steering", {}), folder / GENERATOR_FILE)
        elif (folder / "probe.json").is_file():
            probes = {_kind(read_config(folder)): folder}
        else:
            raise FileNotFoundError(f"{path} holds neither {GENERATOR_FILE} nor probe.json: not a kvprobe generator or probe")
        configs = {name: read_config(p) for name, p in probes.items()}
        if "difficulty" not in configs and "correctness" not in configs:
            raise ValueError(f"{path}: a switch probe alone cannot steer; pair it with a difficulty probe (generator.json)")
        base = next(iter(configs.values()))["base_model"]
        for name, config in configs.items():  # every probe must belong to the same base model
            if config["base_model"]["fingerprint"] != base["fingerprint"]:
                raise ProbeMismatch(f"probe {name!r} in {probes[name]} was trained on {config['base_model']['name']!r}, "
                                    f"the others on {base['name']!r}: a generator's probes must share one base model")
        if model is None:
            model = load_model(ModelSpec(name=base["name"], dtype=dtype or base["dtype"], device_map=device_map))
        elif not isinstance(model, LoadedModel):
            model = _wrap(model, tokenizer)
        loaded = {name: load_probe(p, model) for name, p in probes.items()}
        gen = cls(model, loaded.get("difficulty"), loaded.get("correctness"), configs, steering, loaded.get("switch"))
        gen.path = folder.resolve()
        return gen

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the generator folder whole: it appears complete or not at all (an older one stays until then)."""
        probes = {name: probe for name, probe in (("difficulty", self.difficulty), ("correctness", self.correctness),
                                                  ("switch", self.switch)) if probe is not None}
        meta = {"format": "kvprobe-generator", "kvprobe": kvprobe.__version__, "probes": {name: name for name in probes},
                "base_model": next(iter(self.configs.values()))["base_model"], "steering": asdict(self.steering)}
        with replace_folder(path, GENERATOR_FILE, set(PROBE_KINDS) | {GENERATOR_FILE}) as staging:
            for name, probe in probes.items():
                write_probe(probe, staging / name, self.configs[name])
            (staging / GENERATOR_FILE).write_text(json.dumps(meta, indent=1))
        return Path(path)

    @classmethod
    def from_probes(cls, lm: LoadedModel, difficulty: str | Path | None = None, correctness: str | Path | None = None,
                    steering: SteeringSpec | None = None, switch: str | Path | None = None) -> "KVProbeGenerator":
        """Assemble a generator from exported probe folders (e.g. ``python -m kvprobe.fit`` outputs)."""
        folders = {k: Path(v) for k, v in (("difficulty", difficulty), ("correctness", correctness), ("switch", switch)) if v}
        loaded = {k: load_probe(v, lm) for k, v in folders.items()}
        configs = {k: read_config(v) for k, v in folders.items()}
        return cls(lm, loaded.get("difficulty"), loaded.get("correctness"), configs, steering, loaded.get("switch"))

    # --- prompts ----------------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt, mode: str) -> list[int]:
        """Token ids of ``prompt`` (a question string, an ``Item`` or a chat message list) in ``mode``."""
        spec = copy.deepcopy(self.prompt)
        spec.mode = mode
        if isinstance(prompt, str):
            prompt = Item("live", prompt, "")
        if isinstance(prompt, Item):
            return prompt_ids(prompt, spec, self.lm.tokenizer)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return chat_ids(with_instruction(prompt, spec, self.lm.tokenizer), spec, self.lm.tokenizer)
        raise ValueError(f"a prompt is a string, a kvprobe Item or a list of chat messages, not {type(prompt).__name__}")

    # --- generation ---------------------------------------------------------------------------------------------------
    def generate(self, prompts, policy: str = "route", max_new_tokens: dict[str, int] | int | None = None,
                 stream: bool = False, oracle_modes: list[str] | None = None):
        """Greedy generation under ``policy``. One prompt -> ``(text, GenerationResult)``; a list -> a list of them.

        With ``stream=True`` returns an iterator of events (dicts with ``type`` in ``route``, ``text``, ``switch``,
        ``done``; each names its ``row``) as they happen.
        """
        if not isinstance(prompts, (str, Item, list, tuple)):
            raise ValueError(f"prompts: a string, a kvprobe Item, a chat (list of messages) or a list of these, not {type(prompts).__name__}")
        single = isinstance(prompts, (str, Item)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("generate needs at least one prompt")
        events = self._events(batch, policy, self._caps(max_new_tokens), oracle_modes)
        if stream:
            return events
        results: dict[int, GenerationResult] = {}
        for event in events:
            if event["type"] == "done":
                results[event["row"]] = event["result"]
        out = [(results[i].text, results[i]) for i in range(len(batch))]
        return out[0] if single else out

    def _caps(self, max_new_tokens) -> dict[str, int]:
        if max_new_tokens is None:
            return dict(self.max_new_tokens)
        if not isinstance(max_new_tokens, dict):
            max_new_tokens = {"fast": max_new_tokens, "slow": max_new_tokens}
        return dict(self.max_new_tokens) | check_token_caps(max_new_tokens)

    def _check_context(self, batch: list, policy: str, caps: dict[str, int], oracle_modes) -> None:
        """Refuse a prompt that, with its mode's token cap, would run past the model's positions (the model would
        decode garbage there, with a confident score)."""
        limit = self.lm.shape.max_positions
        if not limit:
            return
        for i, prompt in enumerate(batch):
            modes = [oracle_modes[i]] if policy == "oracle" else [policy] if policy in ("fast", "slow") else ["fast", "slow"]
            for mode in modes:
                n = len(self.prompt_ids(prompt, mode))
                if n + caps[mode] > limit:
                    raise ValueError(f"prompt {i} is {n} tokens in {mode} mode; with max_new_tokens {caps[mode]} that is more "
                                     f"than the model's {limit} positions: shorten it or lower max_new_tokens")

    def _events(self, batch: list, policy: str, caps: dict[str, int], oracle_modes) -> Iterator[dict]:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
        if policy.startswith("route") and self.difficulty is None:
            raise ValueError(f"policy {policy!r} needs a difficulty probe; this generator has only a correctness probe")
        if policy == "route+switch" and self.switch is None:
            raise ValueError("policy 'route+switch' needs a switch probe (python -m kvprobe.fit --config configs/switch.yaml, "
                             "then python -m kvprobe.steering ... --switch <folder>)")
        if policy == "oracle" and (oracle_modes is None or len(oracle_modes) != len(batch)
                                   or any(m not in ("fast", "slow") for m in oracle_modes)):
            raise ValueError(f"policy 'oracle' needs oracle_modes: one 'fast'/'slow' per prompt, not {oracle_modes!r}")
        self._check_context(batch, policy, caps, oracle_modes)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if policy.startswith("route"):
                groups = yield from self._route(batch, t0, switching=policy == "route+switch")
            else:
                modes = oracle_modes if policy == "oracle" else [policy] * len(batch)
                groups = []
                for mode in ("fast", "slow"):
                    rows = [_Row(i, self.prompt_ids(p, mode), mode, t0=t0) for i, (p, m) in enumerate(zip(batch, modes)) if m == mode]
                    if rows:
                        groups.append((rows, None))
            for rows, state in groups:
                if state is None:
                    state = self._prefill(rows, switching=False)
                yield from self._decode(rows, state, caps, switch=policy == "route+switch")

    # --- the decode loop's pieces -------------------------------------------------------------------------------------
    def _forward(self, state: dict, block: list[list[int]], fed: list[bool] | None = None) -> torch.Tensor:
        """Feed one right-aligned block per row (shorter rows padded inside the sequence, masked); returns the last
        column's logits. ``fed[i]`` False: row i is finished and feeds only masked padding."""
        pad = self.lm.tokenizer.pad_token_id
        width = max(len(b) for b in block)
        ids = torch.full((len(block), width), pad, dtype=torch.long)
        mask = torch.zeros((len(block), width), dtype=torch.long)
        for i, b in enumerate(block):
            if b and (fed is None or fed[i]):
                ids[i, width - len(b):] = torch.tensor(b)
                mask[i, width - len(b):] = 1
        state["mask"] = mask if state.get("mask") is None else torch.cat([state["mask"], mask], 1)
        positions = (state["mask"].cumsum(1) - 1).clamp_min(0)[:, -width:]
        device = self.lm.input_device
        out = self.lm.model(input_ids=ids.to(device), attention_mask=state["mask"].to(device), position_ids=positions.to(device),
                            use_cache=True, **cache_argument(self.lm.model, state["cache"]), **last_logits_only(self.lm.model))
        self._track(state, fed)
        return out.logits[:, -1].float()

    def _track(self, state: dict, fed: list[bool] | None) -> None:
        """Push the newly fed position into each row's ring buffer of the latest ``switch_window`` positions: its
        layer-averaged K and/or V (a ``token_kv`` trajectory entry, fp16 like the stored one) projected by the switch
        probe's first layer (``LiveSwitch``). Of a prompt, only its last position counts (it emits the first answer
        token). ``fed[i]`` False: row i fed only padding this step. One column of every layer (K, V or both: what
        the probe reads) per step."""
        if not state["switching"]:
            return
        t = time.perf_counter()
        live = self._live_switch
        position = newest_kv(state["cache"], self.lm.input_device, live.kv).float().mean(1).half().float()
        projected = live.project(position)  # (batch, hidden)
        recent = state.get("recent")
        if recent is None:
            recent = projected.new_zeros((projected.shape[0], self.switch_window, projected.shape[1]))
        shifted = torch.cat([recent[:, 1:], projected[:, None]], 1)
        if fed is not None and not all(fed):
            shifted = torch.where(torch.tensor(fed, device=shifted.device).view(-1, 1, 1), shifted, recent)
        state["recent"] = shifted
        state["track_seconds"] = state.get("track_seconds", 0.0) + time.perf_counter() - t

    def _switch_scores(self, state: dict, rows: list[int]) -> list[float]:
        """The switch probe's scores of the given rows' live windows."""
        recent = state["recent"] if len(rows) == len(state["recent"]) else state["recent"][rows]
        return self._live_switch.scores(recent.sum(1))

    def _window_scores(self, state: dict) -> torch.Tensor:
        """Difficulty scores from each row's last ``window`` real positions, as capture stored them (fp16)."""
        probe = self.difficulty
        pairs = layer_kv(state["cache"], device=self.lm.input_device)
        window = F.window_kv(pairs, state["mask"], probe.hparams.window, self.window_layers).half().float()
        pooled = F.pool_positions(window, probe.hparams.position_pool)
        return probe.score(probe(probe.pooled_inputs(pooled))).cpu()

    def _prefill(self, rows: list[_Row], switching: bool) -> dict:
        """Left-padded prefill of each row's prompt; ``switching``: keep the switch probe's ring buffer."""
        state = {"cache": self._new_cache(), "mask": None, "switching": switching}
        state["logits"] = self._forward(state, [r.ids for r in rows])
        state["answer_from"] = state["mask"].shape[1] - 1  # every prompt ends in the last column (left padding)
        for r in rows:
            r.prompt_tokens += len(r.ids)
        return state

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.model.config)

    def _route(self, batch: list, t0: float, switching: bool):
        """Prefill the route_on prompts, score them, split the batch by mode; rows whose mode differs from route_on
        keep their shared prompt prefix from the cache and prefill only the rest. Returns (rows, state) groups."""
        first = self.route_on
        other = "slow" if first == "fast" else "fast"
        rows = [_Row(i, self.prompt_ids(p, first), first, t0=t0) for i, p in enumerate(batch)]
        state = self._prefill(rows, switching)
        t = time.perf_counter()
        scores = self._window_scores(state)
        threshold = self.difficulty.thresholds[self.steering.threshold]["threshold"]
        per_row = (time.perf_counter() - t) / len(rows)
        picks = {"fast": [], "slow": []}
        for j, r in enumerate(rows):
            r.route_score, r.probe_seconds = float(scores[j]), per_row
            r.mode = "slow" if r.route_score > threshold else "fast"
            picks[r.mode].append(j)
            yield {"type": "route", "row": r.index, "mode": r.mode, "score": r.route_score, "threshold": threshold}
        # the rerouted rows copy their prefix out of the routing cache first; then it is cut down to the kept rows
        rerouted = self._reroute([rows[j] for j in picks[other]], picks[other], state, batch, other) if picks[other] else None
        groups = []
        if picks[first]:
            keep = torch.tensor(picks[first])
            state["cache"].batch_select_indices(keep)  # a CPU index serves layers on any device
            kept = {"cache": state["cache"], "mask": state["mask"][keep], "logits": state["logits"][keep],
                    "switching": state["switching"], "answer_from": state["answer_from"]}
            if state.get("recent") is not None:
                kept["recent"] = state["recent"][keep]
            groups.append(([rows[j] for j in picks[first]], kept))
        if rerouted:
            groups.append(rerouted)
        return groups

    def _reroute(self, rows: list[_Row], where: list[int], state: dict, batch: list, mode: str):
        """Rows switching prompt before decoding: copy the shared prefix's KV out of the routing cache, prefill the rest."""
        pairs = layer_kv(state["cache"])
        width = state["mask"].shape[1]
        targets = [self.prompt_ids(batch[r.index], mode) for r in rows]
        shared = [_common_prefix(r.ids, t) for r, t in zip(rows, targets)]
        lp = max(shared)
        cache = self._new_cache()
        for layer, (k, v) in enumerate(pairs):
            nk = torch.zeros((len(rows),) + k.shape[1:2] + (lp,) + k.shape[3:], dtype=k.dtype, device=k.device)
            nv = torch.zeros_like(nk)
            for i, (j, r, c) in enumerate(zip(where, rows, shared)):
                start = width - len(r.ids)  # this row's prompt began here (left padding)
                nk[i, :, lp - c:] = k[j, :, start:start + c]
                nv[i, :, lp - c:] = v[j, :, start:start + c]
            cache.update(nk, nv, layer)
        mask = torch.zeros((len(rows), lp), dtype=torch.long)
        for i, c in enumerate(shared):
            mask[i, lp - c:] = 1
        new = {"cache": cache, "mask": mask, "switching": state["switching"]}
        new["logits"] = self._forward(new, [t[c:] for t, c in zip(targets, shared)])
        new["answer_from"] = new["mask"].shape[1] - 1
        for r, t, c in zip(rows, targets, shared):
            r.ids, r.prompt_tokens = list(t), r.prompt_tokens + len(t) - c
        return rows, new

    def _decode(self, rows: list[_Row], state: dict, caps: dict[str, int], switch: bool) -> Iterator[dict]:
        tok = self.lm.tokenizer
        eos = self.lm.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or [tok.eos_token_id]))
        texts = {r.index: "" for r in rows}
        for r in rows:
            r.chosen = r.mode
        logits = state.pop("logits")
        while True:
            active = [r for r in rows if not r.done]
            for r in active:  # the switch probe's ring buffer upkeep is probe time too
                r.probe_seconds += state.get("track_seconds", 0.0) / len(active)
            state["track_seconds"] = 0.0
            next_ids = logits.argmax(-1).tolist()
            blocks, fed = [], []
            for j, r in enumerate(rows):
                if r.done:
                    blocks.append([tok.pad_token_id]), fed.append(False)
                    continue
                if r.forced:  # one cue token per step: a multi-token block would pad every other row inside its
                    blocks.append([r.forced.pop(0)]), fed.append(True)  # sequence and change their float sums
                    continue
                t = next_ids[j]
                r.out.append(t)
                r.tokens[r.mode] += 1
                r.in_mode += 1
                text = tok.decode(r.out, skip_special_tokens=True)
                if text != texts[r.index]:
                    yield {"type": "text", "row": r.index, "text": text[len(texts[r.index]):]}
                    texts[r.index] = text
                if t in eos or r.in_mode >= caps[r.mode]:
                    r.done = True
                    blocks.append([tok.pad_token_id]), fed.append(False)
                else:
                    blocks.append([t]), fed.append(True)
            if switch:
                yield from self._maybe_switch(rows, state, blocks, texts)
            if all(r.done for r in rows):
                break
            for r, b, f in zip(rows, blocks, fed):
                if f:
                    r.ids.extend(b)
            logits = self._forward(state, blocks, fed)
        t = time.perf_counter()
        confidence = self._confidence(state) if self.correctness is not None else [None] * len(rows)
        spent = (time.perf_counter() - t) / len(rows)
        for r in rows:
            r.probe_seconds += spent
        for j, r in enumerate(rows):
            result = GenerationResult(
                text=texts[r.index], mode=r.chosen, final_mode=r.mode, route_score=r.route_score, switched_at=r.switched_at,
                switch_score=r.switch_score, tokens=dict(r.tokens), cue_tokens=r.cue, prompt_tokens=r.prompt_tokens,
                confidence=confidence[j], seconds=time.perf_counter() - r.t0, probe_seconds=r.probe_seconds, token_ids=list(r.out),
                switch_trace=list(r.trace),
            )
            yield {"type": "done", "row": r.index, "result": result}

    def _maybe_switch(self, rows: list[_Row], state: dict, blocks: list[list[int]], texts: dict) -> Iterator[dict]:
        """Score the latest window of every slow row due for a probe; arm above ``switch_high``, switch the armed
        ones below ``switch_low``: the answer cue follows, one token per step."""
        s = self.steering
        due = [j for j, r in enumerate(rows) if not r.done and r.switched_at is None and r.mode == "slow"
               and r.in_mode >= s.min_tokens and r.in_mode % s.probe_every == 0]
        if not due:
            return
        t = time.perf_counter()
        scores = self._switch_scores(state, due)
        spent = (time.perf_counter() - t) / len(due)
        for j, score in zip(due, scores):
            r = rows[j]
            r.probe_seconds += spent
            r.trace.append((r.in_mode, score))
            if not r.armed:
                r.armed = score > s.switch_high
                continue
            if score >= s.switch_low:
                continue
            r.switched_at, r.switch_score = r.tokens["fast"] + r.tokens["slow"], score
            r.mode, r.in_mode = "fast", 0
            block = cue_block(self.lm.tokenizer, r.ids[-4:], blocks[j][0], self.steering.answer_cue)
            blocks[j], r.forced = block[:1], block[1:]
            r.out[-1:] = block  # the decoded token, possibly merged with the cue's first characters
            r.cue += len(block) - 1
            yield {"type": "switch", "row": r.index, "at": r.switched_at, "score": score, "to": "fast"}
            text = self.lm.tokenizer.decode(r.out, skip_special_tokens=True)
            yield {"type": "text", "row": r.index, "text": text[len(texts[r.index]):]}
            texts[r.index] = text

    def _confidence(self, state: dict) -> list[float]:
        """P(correct) of each row's answer from its per-layer K and V averaged over the answer's positions (the last
        prompt position, then every fed answer or cue token: what capture stores), read from the cache once, when
        decoding ends."""
        start = state["answer_from"]
        pooled = F.pooled_positions(layer_kv(state["cache"], device=self.lm.input_device), state["mask"][:, start:], start)
        probe = self.correctness
        return probe.probability(probe(probe.inputs({"response_kv": pooled}))).tolist()


def _steering_spec(saved: dict, where: Path) -> SteeringSpec:
    """The steering settings a generator folder saved; unknown keys (another kvprobe version's) are named."""
    known = {f.name for f in fields(SteeringSpec)}
    if unknown := sorted(set(saved) - known):
        raise ValueError(f"{where}: steering settings {unknown} are not SteeringSpec fields {sorted(known)}; this folder "
                         "was written by another kvprobe version: reassemble it with python -m kvprobe.steering")
    return SteeringSpec(**saved)


def _read_generator(path: Path) -> dict:
    """generator.json, checked: a damaged or foreign file is named with the command that rebuilds it."""
    fix = "rebuild it with kvprobe assemble (README.md)"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None
    probes = meta.get("probes") if isinstance(meta, dict) else None
    if not isinstance(probes, dict) or not probes or set(probes) - set(PROBE_KINDS):
        raise ValueError(f"{path} must name its probes as {{kind: subfolder}} with kinds from {PROBE_KINDS}; {fix}")
    if not isinstance(meta.get("steering", {}), dict):
        raise ValueError(f"{path}: 'steering' must be an object of SteeringSpec settings; {fix}")
    return meta


def _kind(config: dict) -> str:
    """Which generator slot an exported probe fills, from its class."""
    return {"DifficultyProbe": "difficulty", "CorrectnessProbe": "correctness", "SwitchProbe": "switch"}[config["probe_class"].rsplit(".", 1)[1]]


def _wrap(model, tokenizer) -> LoadedModel:
    """A transformers model and tokenizer as a LoadedModel; its fingerprint comes from the folder it was loaded from."""
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer too (tokenizer=...), or a kvprobe LoadedModel")
    source = getattr(model, "name_or_path", "") or ""
    try:
        _, digest = resolve(source)
    except (FileNotFoundError, ValueError):
        digest = "unknown"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    spec = ModelSpec(name=source or type(model).__name__, dtype=str(model.dtype).removeprefix("torch."))
    return LoadedModel(model.eval(), tokenizer, spec, source, digest, model_shape(model.config))


def cue_block(tokenizer, fed: list[int], token: int, cue: str) -> list[int]:
    """What to feed at a switch: the just-decoded ``token`` (not yet in the cache) and the answer cue, tokenised as
    the text would be. Appending the cue's own ids can leave a sequence no tokenizer produces (" " + "\n" + "\n"
    where the text " \n\n" tokenises as " \n" + "\n"), and the model then continues as after no real text;
    re-tokenising the last few ``fed`` tokens with the token and the cue gives the ids a fresh prefill of the
    switched text would have. Used when it leaves the fed tokens as they are (the cache holds them); otherwise
    the token and the cue's ids."""
    ids = tokenizer.encode(tokenizer.decode(fed + [token], skip_special_tokens=False) + cue, add_special_tokens=False)
    if ids[: len(fed)] == fed and len(ids) > len(fed):
        return ids[len(fed):]
    return [token] + tokenizer.encode(cue, add_special_tokens=False)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> Path:
    """Assemble a generator folder from exported probes: ``kvprobe assemble --difficulty D --correctness C --out O``
    (or ``python -m kvprobe.steering ...``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="kvprobe assemble", description=main.__doc__)
    parser.add_argument("--difficulty", help="exported difficulty probe folder (python -m kvprobe.fit --config configs/difficulty.yaml)")
    parser.add_argument("--correctness", help="exported correctness probe folder (source kv)")
    parser.add_argument("--switch", help="exported switch probe folder (python -m kvprobe.fit --config configs/switch.yaml)")
    parser.add_argument("--out", required=True, help="generator folder to write")
    parser.add_argument("--threshold", default=SteeringSpec.threshold, help="calibrated threshold that routes")
    args = parser.parse_args(argv)
    first = args.difficulty or args.correctness
    if not first:
        parser.error("give --difficulty and/or --correctness")
    base = read_config(first)["base_model"]
    lm = load_model(ModelSpec(name=base["name"], dtype=base["dtype"]))
    gen = KVProbeGenerator.from_probes(lm, args.difficulty, args.correctness, SteeringSpec(threshold=args.threshold), args.switch)
    folder = gen.save_pretrained(args.out)
    print(f"[kvprobe] generator for {base['name']} written to {folder}")
    return folder


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe assemble")
