"""Steering generation live with trained probes.

- ``generator``: ``KVProbeGenerator``, the facade (``from_pretrained``, ``generate``, ``stream``);
- ``engine``: the batched decode loop, which knows no probe and calls hooks;
- ``policies``: the probes as hooks (router, switcher, confidence, escalation, sampler) and the fixed modes;
- ``state``: the loop's state and the ``Hook`` interface; ``config``: ``SteeringSpec``, ``GenerationConfig``;
- ``events``: ``GenerationResult`` and the typed stream events; ``folder``: generator folders and ``kvprobe assemble``.
"""

from kvprobe.steering.config import GenerationConfig, SteeringSpec
from kvprobe.steering.engine import DecodeEngine
from kvprobe.steering.events import DoneEvent, EscalateEvent, Event, GenerationResult, RouteEvent, Sample, SwitchEvent, TextEvent
from kvprobe.steering.generator import POLICIES, KVProbeGenerator
from kvprobe.steering.policies import Confidence, Copies, Escalate, FixedMode, GivenModes, OutputScores, Router, Sampler, Switcher, cue_block
from kvprobe.steering.state import DecodeState, Hook, Row, timed

__all__ = ["KVProbeGenerator", "POLICIES", "SteeringSpec", "GenerationConfig", "GenerationResult", "Event", "RouteEvent",
           "TextEvent", "SwitchEvent", "EscalateEvent", "DoneEvent", "DecodeEngine", "DecodeState", "Row", "Hook", "timed", "FixedMode",
           "GivenModes", "Router", "Switcher", "Confidence", "OutputScores", "Escalate", "Sampler", "Copies", "Sample", "cue_block"]
