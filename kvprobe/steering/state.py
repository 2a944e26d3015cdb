"""The decode loop's state (``Row``, ``DecodeState``) and its hook interface (``Hook``), which policies implement."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from kvprobe.prompts import MODES
from kvprobe.steering.events import Event, GenerationResult

if TYPE_CHECKING:
    from kvprobe.steering.engine import DecodeEngine


@dataclass
class Row:
    """One prompt being answered."""

    index: int  # which prompt of the call
    ids: list[int]  # every position fed so far, prompt included
    mode: str  # the mode it decodes in now
    t0: float
    start_mode: str = ""  # the mode decoding started in
    prompt_len: int = 0  # the prompt's length: ids[:prompt_len] is the prompt
    prompt_tokens: int = 0
    out: list[int] = field(default_factory=list)  # decoded and cue tokens, in order
    text: str = ""
    streamed: str = ""  # the part of ``text`` already sent as events (``DecodeEngine.refresh_text``)
    tokens: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})
    in_mode: int = 0  # tokens decoded since the current mode began
    cue: int = 0
    forced: list[int] = field(default_factory=list)  # ids still to feed one per step (a switch's cue)
    done: bool = False
    route_score: float | None = None
    slow_helps: float | None = None  # P(slow right | fast wrong), when the router's probe gives it
    switched_at: int | None = None
    switch_score: float | None = None
    switch_trace: list[tuple[int, float]] = field(default_factory=list)
    confidence: float | None = None
    probe_seconds: float = 0.0
    answer_mode: str = ""  # the mode the current answer began in (a switch does not change it)
    step_stats: list[tuple[float, float]] = field(default_factory=list)  # the answer's (max-prob, entropy) per token
    reprompt_tokens: int = 0
    escalated: bool = False
    verify_score: float | None = None
    sample: int | None = None  # which of a prompt's samples this row is (``sample`` policy); None: its only answer
    reported: bool = False  # a hook has already given this row's prompt its result (``DoneEvent``)

    def reopen(self, mode: str) -> None:
        """Answer again, in ``mode``, from the prompt: called by a hook's ``on_finish``, the engine then crops the
        cache back to the prompt prefix both modes share and decodes anew. The answer so far is dropped; its
        decoded tokens stay counted."""
        self.mode, self.done, self.in_mode, self.out, self.text, self.forced = mode, False, 0, [], "", []
        self.streamed = ""
        self.answer_mode, self.step_stats, self.confidence = "", [], None

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text, mode=self.start_mode, final_mode=self.mode, route_score=self.route_score,
            switched_at=self.switched_at, switch_score=self.switch_score, tokens=dict(self.tokens), cue_tokens=self.cue,
            prompt_tokens=self.prompt_tokens, confidence=self.confidence, seconds=time.perf_counter() - self.t0,
            probe_seconds=self.probe_seconds, reprompt_tokens=self.reprompt_tokens, escalated=self.escalated,
            verify_score=self.verify_score, token_ids=list(self.out), switch_trace=list(self.switch_trace))


@dataclass
class DecodeState:
    """The rows decoding together and the cache they share."""

    rows: list[Row]
    prompt_mode: str  # the mode whose prompts were prefilled
    cache: object  # a transformers DynamicCache
    mask: torch.Tensor | None = None  # (rows, columns): 1 = a real position
    logits: torch.Tensor | None = None  # the last column's logits, (rows, vocab)
    answer_from: list[int] = field(default_factory=list)  # per row: the column of its last prompt position (it emits
    # the first answer token); rows of one prefill share it, rows merged in from another (``DecodeEngine.merge``) not
    row_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # hooks' per-row state, batch-first
    picked: list[bool] = field(default_factory=list)  # at ``on_token``: rows that chose a token from ``logits``

    def expand(self, copies: int | list[int]) -> None:
        """Each row ``copies`` times in place (or row i ``copies[i]`` times), the cache too: copy ``j`` of a row is
        its sample ``j`` (a row kept once stays sample None); only the first counts the prompt's prefill. One
        prefill serves a prompt's samples."""
        counts = [copies] * len(self.rows) if isinstance(copies, int) else list(copies)
        picked = self.select([i for i, c in enumerate(counts) for _ in range(c)])  # rows repeated, cache included
        js = [j for c in counts for j in range(c)]
        many = [c > 1 or isinstance(copies, int) for c in counts for _ in range(c)]
        self.rows = [dataclasses.replace(copy.deepcopy(r), sample=j if m else r.sample,
                                         prompt_tokens=r.prompt_tokens if j == 0 else 0)
                     for r, j, m in zip(picked.rows, js, many)]
        self.mask, self.logits, self.row_tensors, self.answer_from = picked.mask, picked.logits, picked.row_tensors, picked.answer_from

    def select(self, keep: list[int]) -> "DecodeState":
        """The state of rows ``keep`` only (the cache is cut in place)."""
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index)  # a CPU index serves layers on any device
        return DecodeState([self.rows[j] for j in keep], self.prompt_mode, self.cache, self.mask[index],
                           self.logits[index], [self.answer_from[j] for j in keep],
                           {k: v[index.to(v.device)] for k, v in self.row_tensors.items()})


class Hook:
    """A live probe (or any observer) on the decode loop. Every method may do nothing; those returning events
    return an iterable of ``kvprobe.steering.events`` (or None). A hook adds the time it spends to the rows'
    ``probe_seconds`` (``timed``)."""

    def start_modes(self, prompts: list) -> list[str] | None:
        """The mode each prompt is prompted in first; None leaves it to another hook."""
        return None

    def on_prefill(self, engine: "DecodeEngine", state: DecodeState) -> Iterable[Event] | None:
        """The prompts are in the cache, nothing is decoded. Setting a row's ``mode`` re-prompts it in that mode."""

    def on_forward(self, engine: "DecodeEngine", state: DecodeState, blocks: list[list[int]], fed: list[bool]) -> None:
        """The model just ran on ``blocks`` (right-aligned): the cache's newest column is what row i fed (``fed[i]``;
        else masked padding)."""

    def on_token(self, engine: "DecodeEngine", state: DecodeState, blocks: list[list[int]]) -> Iterable[Event] | None:
        """Each row's next block is chosen (``blocks[i]``), not yet fed; a hook may rewrite it."""

    def on_finish(self, engine: "DecodeEngine", state: DecodeState) -> Iterable[Event] | None:
        """Every row of ``state`` has finished; the cache still holds their answers. ``Row.reopen`` answers a row
        again in another mode."""


class timed:
    """``with timed(rows):`` adds the block's wall time, split evenly, to the rows' probe time."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __enter__(self) -> "timed":
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        share = (time.perf_counter() - self.t) / max(1, len(self.rows))
        for r in self.rows:
            r.probe_seconds += share
