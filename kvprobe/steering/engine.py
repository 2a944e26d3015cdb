"""A batched decode loop over a ``DynamicCache`` that knows no probe: it prefills, steps, re-prompts and selects
rows, and calls its hooks (``kvprobe.steering.policies``) at each of those points, so that probes run between steps
on the very cache the loop builds.

Coordinates: rows are left-padded, so every prompt ends in the last column of the prefill. A step feeds one block per
row (one token; a longer block right-aligned, shorter rows padded inside their sequence and masked); a finished row
feeds masked padding. Positions count only unmasked columns, so a padded row decodes what it decodes alone.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from kvprobe.cache import cache_argument, layer_kv
from kvprobe.decoding import draw
from kvprobe.models import LoadedModel, eos_ids, last_logits_only, left_pad
from kvprobe.prompts import MODES
from kvprobe.steering.config import GenerationConfig
from kvprobe.steering.events import DoneEvent, Event, TextEvent
from kvprobe.steering.state import DecodeState, Hook, Row


class DecodeEngine:
    """One call's decoding: ``run`` answers every prompt and yields events as they happen. Its steps: ``prefill``,
    ``forward`` (one step), ``reprompt`` (crop a row back to the prompt prefix another mode shares, prefill the rest),
    ``DecodeState.select``; hooks drive them (``kvprobe.steering.state.Hook``)."""

    def __init__(self, lm: LoadedModel, prompt_ids: Callable[[object, str], list[int]], hooks: list[Hook],
                 config: GenerationConfig, caps: dict[str, int]):
        self.lm, self.prompt_ids, self.hooks, self.config, self.caps = lm, prompt_ids, hooks, config, caps
        self.eos = set(eos_ids(lm))
        self.samplers: dict[tuple | None, torch.Generator] = {}  # see ``generator``

    def _seed(self, prompts: list) -> None:
        """The call's sampling generators, fresh for every run (see ``generator``)."""
        for name in ("seed", "do_sample", "temperature", "top_p"):
            value = getattr(self.config, name)
            if isinstance(value, (list, tuple)) and len(value) != len(prompts):
                raise ValueError(f"{name} is a list of {len(value)} values for {len(prompts)} prompts: give one per prompt")
        self.samplers = {}

    def generator(self, row: Row) -> torch.Generator | None:
        """The random generator ``row`` samples from: None without a seed (torch's global one); for an int seed one
        generator for the call; for a list of seeds one per prompt; and sample ``j`` of a prompt (``Row.sample``)
        its own, seeded with the prompt's seed + ``j``, so it draws what a single-prompt call with that seed draws."""
        seed = self.config.seed
        if seed is None:
            return None
        if isinstance(seed, int) and row.sample is None:
            key, value = None, seed
        else:
            key = (row.index, row.sample or 0)
            value = (seed if isinstance(seed, int) else seed[row.index]) + (row.sample or 0)
        if key not in self.samplers:
            self.samplers[key] = torch.Generator(device=self.lm.input_device).manual_seed(value)
        return self.samplers[key]

    def run(self, prompts: list) -> Iterator[Event]:
        self.prompts = prompts
        self._seed(prompts)
        with torch.inference_mode():
            for state in (yield from self._enter(list(range(len(prompts))))):
                yield from self.decode(state)

    def run_open(self, prompts: list, admit: Callable[[], list]) -> Iterator[Event]:
        """``run`` for a server (continuous batching): between two steps, the prompts ``admit()`` returns join the
        running batch (prefilled, routed, their cache merged in, ``merge``), and each row finishes on its own: its
        hooks' ``on_finish``, its ``DoneEvent`` and the release of its row come when it ends (before the next
        forward of the rows still decoding), not when the batch does. Every row decodes in one state whatever its
        mode. Prompts are numbered in arrival order (an admitted prompt's ``row`` continues the count); ``admit`` may
        extend ``config.seed`` (a list) for them. Not for hooks that finish a prompt's rows together (``Sampler``)."""
        self.prompts = []
        self.samplers = {}
        live, waiting = None, list(prompts)
        with torch.inference_mode():
            while True:
                if waiting:
                    first = len(self.prompts)
                    self.prompts += waiting
                    states = yield from self._enter(list(range(first, len(self.prompts))))
                    waiting = []
                    for state in states:
                        live = state if live is None else self.merge(live, state)
                if live is None:
                    return
                blocks, fed = yield from self._pick(live)
                done = [j for j, r in enumerate(live.rows) if r.done]
                again = []
                if done:  # answered before the others' next forward, which then runs without their rows
                    finished = self.take(live, done)
                    rest = [j for j, r in enumerate(live.rows) if not r.done]
                    live = live.select(rest) if rest else None
                    blocks, fed = [blocks[j] for j in rest], [fed[j] for j in rest]
                    again = yield from self._finish(finished)
                if live is not None:
                    self._feed(live, blocks, fed)
                for state in again:
                    live = state if live is None else self.merge(live, state)
                waiting = list(admit() or [])

    def _enter(self, indices: list[int]):
        """Prefill prompts ``indices`` in their start modes and route them: the states they decode in (a
        generator: yields the hooks' events, returns the states)."""
        t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in indices]
        modes = next((m for h in self.hooks if (m := h.start_modes(prompts)) is not None), None)
        if modes is None:
            raise ValueError("no hook says which mode to prompt in")
        states = []
        for mode in MODES:
            rows = [Row(i, self.prompt_ids(self.prompts[i], mode), mode, t0) for i, m in zip(indices, modes) if m == mode]
            if rows:
                state = self.prefill(rows, mode)
                yield from self._call("on_prefill", state)
                states += self.regroup(state)
        for state in states:
            self._begin(state)
        return states

    def _begin(self, state: DecodeState) -> None:
        for r in state.rows:
            r.start_mode = r.start_mode or r.mode
            r.answer_mode = r.answer_mode or r.mode

    def _finish(self, state: DecodeState):
        """The hooks' ``on_finish`` for rows that have ended, their ``DoneEvent``s; rows a hook reopened come back
        re-prompted (a generator: yields events, returns their states)."""
        yield from self._call("on_finish", state)
        for r in state.rows:
            if r.done and not r.reported:
                yield DoneEvent(r.index, r.result(), r.sample)
        again = []
        for mode in MODES:
            where = [j for j, r in enumerate(state.rows) if not r.done and r.mode == mode]
            if where:
                again.append(self.reprompt(state, where, mode))
                self._begin(again[-1])
        return again

    def take(self, state: DecodeState, where: list[int]) -> DecodeState:
        """A copy of rows ``where`` of ``state`` (cache included); ``state`` is left as it was."""
        index = torch.tensor(where)
        cache = self.new_cache()
        for layer, (k, v) in enumerate(layer_kv(state.cache)):
            i = index.to(k.device)
            cache.update(k[i].clone(), v[i].clone(), layer)
        return DecodeState([state.rows[j] for j in where], state.prompt_mode, cache, state.mask[index], state.logits[index],
                           [state.answer_from[j] for j in where],
                           {k: v[index.to(v.device)].clone() for k, v in state.row_tensors.items()})

    def merge(self, a: DecodeState, b: DecodeState) -> DecodeState:
        """One state holding the rows of ``a`` then ``b``: the narrower cache is left-padded (masked) to the wider
        one's width, so every row keeps its positions and its answer's columns (``answer_from`` shifts with it)."""
        wa, wb = a.mask.shape[1], b.mask.shape[1]
        width = max(wa, wb)
        cache = self.new_cache()
        for layer, ((ka, va), (kb, vb)) in enumerate(zip(layer_kv(a.cache), layer_kv(b.cache))):
            k = torch.cat([_left_pad(ka, width), _left_pad(kb.to(ka.device), width)], 0)
            v = torch.cat([_left_pad(va, width), _left_pad(vb.to(va.device), width)], 0)
            cache.update(k, v, layer)
        mask = torch.cat([_left_pad(a.mask, width, dim=1), _left_pad(b.mask, width, dim=1)], 0)
        keys = set(a.row_tensors) | set(b.row_tensors)
        if keys != set(a.row_tensors) or keys != set(b.row_tensors):
            raise ValueError(f"cannot merge states whose hooks keep different row tensors ({sorted(a.row_tensors)} vs "
                             f"{sorted(b.row_tensors)})")
        return DecodeState(a.rows + b.rows, a.prompt_mode, cache, mask, torch.cat([a.logits, b.logits.to(a.logits.device)]),
                           [x + width - wa for x in a.answer_from] + [x + width - wb for x in b.answer_from],
                           {k: torch.cat([a.row_tensors[k], b.row_tensors[k].to(a.row_tensors[k].device)]) for k in keys})

    def _step(self, state: DecodeState) -> Iterator[Event]:
        """One decode step of every row of ``state``: ``_pick``, then ``_feed``."""
        blocks, fed = yield from self._pick(state)
        self._feed(state, blocks, fed)

    def _pick(self, state: DecodeState):
        """Pick each row's next token (a forced cue token first), end the rows that are done (eos, their mode's cap,
        a stop string), let the hooks see the blocks (a generator: yields events, returns each row's block and
        whether it is fed)."""
        tok, stops, rows = self.lm.tokenizer, self.config.stop_strings or [], state.rows
        next_ids = self.pick(state.logits, rows)
        blocks, fed = [], []
        state.picked = [not r.done and not r.forced for r in rows]
        for j, r in enumerate(rows):
            if r.done:
                blocks.append([tok.pad_token_id]), fed.append(False)
                continue
            if r.forced:  # one forced token per step: a longer block would pad every other row inside its
                blocks.append([r.forced.pop(0)]), fed.append(True)  # sequence and change their float sums
                continue
            t = next_ids[j]
            r.out.append(t)
            r.tokens[r.mode] += 1
            r.in_mode += 1
            yield from self.refresh_text(r)
            if t in self.eos or r.in_mode >= self.caps[r.mode] or any(s in r.text for s in stops):
                r.done = True
                yield from self.refresh_text(r, final=True)
                blocks.append([tok.pad_token_id]), fed.append(False)
            else:
                blocks.append([t]), fed.append(True)
        yield from self._call("on_token", state, blocks)
        return blocks, [f and not r.done for r, f in zip(rows, fed)]  # a hook may end a row (a cancelled request)

    def _feed(self, state: DecodeState, blocks: list[list[int]], fed: list[bool]) -> None:
        """Feed the picked blocks of the rows still decoding (the others feed masked padding)."""
        if not any(fed):
            return
        for r, b, f in zip(state.rows, blocks, fed):
            if f:
                r.ids.extend(b)
        state.logits = self.forward(state, blocks, fed)

    # --- the loop's steps ---------------------------------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.model.config)

    def forward(self, state: DecodeState, blocks: list[list[int]], fed: list[bool] | None = None) -> torch.Tensor:
        """Feed one right-aligned block per row (shorter rows padded inside the sequence, masked); returns the last
        column's logits. ``fed[i]`` False: row i is finished and feeds only masked padding."""
        fed = [True] * len(blocks) if fed is None else fed
        ids, mask = left_pad(blocks, self.lm.tokenizer.pad_token_id, fed)
        width = ids.shape[1]
        state.mask = mask if state.mask is None else torch.cat([state.mask, mask], 1)
        positions = (state.mask.cumsum(1) - 1).clamp_min(0)[:, -width:]
        device = self.lm.input_device
        out = self.lm.model(input_ids=ids.to(device), attention_mask=state.mask.to(device), position_ids=positions.to(device),
                            use_cache=True, **cache_argument(self.lm.model, state.cache), **last_logits_only(self.lm.model))
        for hook in self.hooks:
            hook.on_forward(self, state, blocks, fed)
        return out.logits[:, -1].float()

    def prefill(self, rows: list[Row], mode: str) -> DecodeState:
        """Left-padded prefill of each row's prompt."""
        state = DecodeState(rows, mode, self.new_cache())
        state.logits = self.forward(state, [r.ids for r in rows])
        state.answer_from = [state.mask.shape[1] - 1] * len(rows)  # every prompt ends in the last column (left padding)
        for r in rows:
            r.prompt_len = len(r.ids)
            r.prompt_tokens += len(r.ids)
        return state

    def regroup(self, state: DecodeState) -> list[DecodeState]:
        """Rows still in the prefilled mode, then rows a hook moved to another mode (re-prompted, see ``reprompt``)."""
        stay = [j for j, r in enumerate(state.rows) if r.mode == state.prompt_mode]
        groups = []
        for mode in MODES:
            moved = [j for j, r in enumerate(state.rows) if r.mode == mode != state.prompt_mode]
            if moved:  # copied out of the cache before it is cut down to the rows that stay
                groups.append(self.reprompt(state, moved, mode))
        if len(stay) == len(state.rows):
            return [state]
        return ([state.select(stay)] if stay else []) + groups

    def reprompt(self, state: DecodeState, where: list[int], mode: str) -> DecodeState:
        """Rows ``where`` prompted in ``mode`` (another, or the same to answer again), before or after they answered:
        the cache is cropped to the prompt prefix both prompts share (copied out; any answer is dropped), only the
        rest of the prompt is prefilled."""
        rows = [state.rows[j] for j in where]
        targets = [self.prompt_ids(self.prompts[r.index], mode) for r in rows]
        # at least the prompt's last position is fed again: it gives the logits of the first answer token
        shared = [min(_common_prefix(r.ids[:r.prompt_len], t), len(t) - 1) for r, t in zip(rows, targets)]
        lp = max(shared)
        cache = self.new_cache()
        for layer, (k, v) in enumerate(layer_kv(state.cache)):
            nk = torch.zeros((len(rows),) + k.shape[1:2] + (lp,) + k.shape[3:], dtype=k.dtype, device=k.device)
            nv = torch.zeros_like(nk)
            for i, (j, r, c) in enumerate(zip(where, rows, shared)):
                start = state.answer_from[j] + 1 - r.prompt_len  # this row's prompt began here (left padding)
                nk[i, :, lp - c:] = k[j, :, start:start + c]
                nv[i, :, lp - c:] = v[j, :, start:start + c]
            cache.update(nk, nv, layer)
        mask = torch.zeros((len(rows), lp), dtype=torch.long)
        for i, c in enumerate(shared):
            mask[i, lp - c:] = 1
        new = DecodeState(rows, mode, cache, mask)
        new.logits = self.forward(new, [t[c:] for t, c in zip(targets, shared)])
        new.answer_from = [new.mask.shape[1] - 1] * len(rows)
        for r, t, c in zip(rows, targets, shared):
            r.ids, r.prompt_len, r.prompt_tokens = list(t), len(t), r.prompt_tokens + len(t) - c
            r.reprompt_tokens += len(t) - c
        return new

    def pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """The next token of each of ``rows``: greedy, or drawn as the config says (``kvprobe.decoding.draw``, the
        sampler capture uses) from each row's generator."""
        c = self.config
        if not c.samples_any:
            return logits.argmax(-1).tolist()
        if not any(isinstance(v, (list, tuple)) for v in (c.do_sample, c.temperature, c.top_p)):
            generators = [self.generator(r) for r in rows]
            shared = generators[0] if all(g is generators[0] for g in generators) else generators
            return draw(logits, shared, c.temperature, c.top_k, c.top_p).tolist()
        out = logits.argmax(-1).tolist()  # settings per prompt: each group of rows sampled as its own settings say
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(rows):
            do_sample, temperature, top_p = c.sampling(r.index)
            if do_sample:
                groups.setdefault((temperature, top_p), []).append(j)
        for (temperature, top_p), where in groups.items():
            drawn = draw(logits[where], [self.generator(rows[j]) for j in where], temperature, c.top_k, top_p)
            for j, token in zip(where, drawn.tolist()):
                out[j] = token
        return out

    def decode(self, state: DecodeState) -> Iterator[Event]:
        """Decode every row of ``state`` to its end (eos, its mode's cap or a stop string)."""
        rows = state.rows
        self._begin(state)
        while not all(r.done for r in rows):
            yield from self._step(state)
        yield from self._call("on_finish", state)
        for r in rows:
            if r.done and not r.reported:
                yield DoneEvent(r.index, r.result(), r.sample)
        for mode in MODES:  # rows a hook reopened: answered again from the cropped cache
            again = [j for j, r in enumerate(rows) if not r.done and r.mode == mode]
            if again:
                yield from self.decode(self.reprompt(state, again, mode))

    def refresh_text(self, row: Row, final: bool = False) -> Iterator[TextEvent]:
        """The row's text from its tokens; the new part as an event. A character still being spelled out by byte
        tokens decodes as U+FFFD until its last byte arrives: it is held back until then (or the answer's end), so
        that the events add up to the final text."""
        row.text = self.lm.tokenizer.decode(row.out, skip_special_tokens=True)
        stable = row.text if final else row.text.rstrip("\ufffd")
        if len(stable) > len(row.streamed) and stable.startswith(row.streamed):
            yield TextEvent(row.index, stable[len(row.streamed):], row.sample)
            row.streamed = stable

    def _call(self, name: str, *args) -> Iterator[Event]:
        for hook in self.hooks:
            yield from getattr(hook, name)(self, *args) or ()


def _left_pad(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``x`` zero-padded on the left of ``dim`` to ``width`` (a cache layer's columns: dim 2; a mask's: dim 1)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
