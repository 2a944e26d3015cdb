"""Tampered generator and probe folders: every case the red team tried is named (file, field, fix), and a property
test mutates the shipped generator folder's JSON files at random: each mutation loads and generates, or raises one of
the package's named errors (a ValueError naming the file, or a missing file), never a raw TypeError, KeyError,
AttributeError, IndexError or RuntimeError."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import real_assets_available
from kvprobe.resources import PRETRAINED

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not real_assets_available(), reason="needs the embedded SmolLM2 (scripts/setup.sh)")]
SHIPPED = PRETRAINED / "smollm2"
FILES = ["generator.json"] + sorted(str(p.relative_to(SHIPPED)) for p in SHIPPED.glob("*/probe.json"))


@pytest.fixture(scope="module")
def lm():
    from kvprobe.models import ModelSpec, load_model

    return load_model(ModelSpec(name="smollm2"))


def copy_shipped(root: Path) -> Path:
    folder = root / "gen"
    shutil.copytree(SHIPPED, folder)
    return folder


def edit(folder: Path, file: str, change) -> None:
    path = folder / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def load_and_generate(folder: Path, lm):
    from kvprobe import KVProbeGenerator

    gen = KVProbeGenerator.from_pretrained(folder, model=lm)
    return gen.generate("What is 2 + 3?", max_new_tokens=2)


CASES = {
    "a slot names no folder": ("generator.json", lambda d: d["probes"].update(difficulty=5), "probes.difficulty must name a subfolder"),
    "a threshold is a list": ("generator.json", lambda d: d["steering"].update(threshold=[1, 2]), "steering threshold must be"),
    "a threshold is a word": ("generator.json", lambda d: d["steering"].update(threshold="high"), "threshold 'high' is neither"),
    "probe_args not an object": ("difficulty/probe.json", lambda d: d.update(probe_args=3), "'probe_args' must be an object"),
    "an unknown probe argument": ("difficulty/probe.json", lambda d: d["probe_args"].update(turbo=True), "probe_args do not build"),
    "no switch calibration": ("switch/probe.json", lambda d: d["calibration"].pop("thresholds"), "lacks its calibrated switch thresholds"),
    "route_on turbo": ("difficulty/probe.json", lambda d: d["difficulty"].update(route_on="turbo"), "route_on must be"),
    "layers beyond the model": ("correctness/probe.json", lambda d: d["probe_args"].update(layers=[999]), "not all layers"),
    "another probe's weights": ("correctness/probe.json", lambda d: d.pop("weights_sha256"), "does not describe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_tampered_case_is_named(case, lm, tmp_path):
    file, change, message = CASES[case]
    folder = copy_shipped(tmp_path)
    edit(folder, file, change)
    if case == "another probe's weights":  # the digest is gone, so only the shapes can tell
        shutil.copy(SHIPPED / "switch" / "probe.safetensors", folder / "correctness" / "probe.safetensors")
    with pytest.raises(ValueError, match=message):
        load_and_generate(folder, lm)


def test_a_difficulty_probe_in_the_correctness_slot_is_named(lm, tmp_path):
    folder = copy_shipped(tmp_path)
    shutil.rmtree(folder / "correctness")
    shutil.copytree(folder / "difficulty", folder / "correctness")
    with pytest.raises(ValueError, match="holds a difficulty probe but sits in the 'correctness' slot"):
        load_and_generate(folder, lm)


def test_weights_damaged_near_the_end_are_refused(lm, tmp_path):
    """A flipped byte near the end of probe.safetensors once loaded and gave confidence=nan with no warning."""
    folder = copy_shipped(tmp_path)
    weights = folder / "correctness" / "probe.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_and_generate(folder, lm)


@pytest.mark.parametrize("target", ["../elsewhere", "absolute", "link"])
def test_a_probe_outside_the_generator_folder_is_refused(target, lm, tmp_path):
    folder = copy_shipped(tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(SHIPPED / "difficulty", outside)
    sub = {"../elsewhere": "../elsewhere", "absolute": str(outside), "link": "linked"}[target]
    if target == "link":
        os.symlink(outside, folder / "linked")
    edit(folder, "generator.json", lambda d: d["probes"].update(difficulty=sub))
    with pytest.raises(ValueError, match="leads outside the generator folder"):
        load_and_generate(folder, lm)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                   st.lists(st.integers(-1000, 1000), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
                   st.sampled_from(["../x", "/etc", "correctness", "switch", "fast", "slow", "kv", "best_at_0.5x_slow"]))


@st.composite
def mutations(draw):
    """(file, path of keys, action, value): one change to one JSON file of the shipped folder."""
    file = draw(st.sampled_from(FILES))
    node, path = json.loads((SHIPPED / file).read_text()), []
    while isinstance(node, dict) and node and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(node)))
        path.append(key)
        node = node[key]
    action = draw(st.sampled_from(["set", "delete", "add"] if path else ["add"]))
    return file, path, action, draw(VALUES)


def apply(data: dict, path: list[str], action: str, value) -> None:
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "set":
        parent[path[-1]] = value
    else:
        target = parent[path[-1]] if path else data
        if isinstance(target, dict):
            target["unknown_key"] = value
        else:
            parent[path[-1]] = value


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations())
def test_mutated_generator_folders_load_or_name_the_problem(lm, mutation):
    file, path, action, value = mutation
    with tempfile.TemporaryDirectory() as root:
        folder = copy_shipped(Path(root))
        edit(folder, file, lambda d: apply(d, path, action, value))
        try:
            result = load_and_generate(folder, lm)
        except (ValueError, FileNotFoundError) as err:  # ProbeMismatch and TaskError are ValueErrors
            assert str(err), f"{type(err).__name__} without a message for {mutation}"
        else:
            assert isinstance(result.text, str)
