"""Generator folders: ``generator.json`` (which probe sits in which subfolder, the base model, the steering
settings) beside one exported probe folder per slot: ``difficulty``, ``correctness`` (slow answers),
``correctness_fast`` (fast answers) and ``switch``."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import kvprobe
from kvprobe.export import ProbeCard, ProbeMismatch, load_probe, read_card, replace_folder, write_probe
from kvprobe.models import LoadedModel, ModelSpec, for_batches, load_model, model_shape, resolve
from kvprobe.resources import resolve_generator
from kvprobe.steering.config import SteeringSpec

GENERATOR_FILE = "generator.json"
SLOTS = ("difficulty", "correctness", "correctness_fast", "switch")  # a correctness slot per mode its probe reads


def slot(card: ProbeCard) -> str:
    """The subfolder of a generator that holds the probe of ``card``: its kind, and for a fast-answer correctness
    probe ``correctness_fast``."""
    return "correctness_fast" if card.kind == "correctness" and card.prompt.mode == "fast" else card.kind


def load(path: str | Path, model=None, tokenizer=None, device_map: str | None = None, dtype: str | None = None):
    """(folder, model, probes by slot, saved SteeringSpec or None) of a generator folder, a single probe folder or a
    shipped alias; the model is the one the probes record unless ``model`` is given."""
    where = resolve_generator(path)
    steering = None
    if (where / GENERATOR_FILE).is_file():
        meta = read_generator(where / GENERATOR_FILE)
        folders = {name: contained(where, sub, name) for name, sub in meta["probes"].items()}
        steering = steering_spec(meta.get("steering", {}), where / GENERATOR_FILE)
    elif (where / "probe.json").is_file():
        folders = {slot(read_card(where)): where}
    else:
        raise FileNotFoundError(f"{path} holds neither {GENERATOR_FILE} nor probe.json: not a kvprobe generator or probe")
    cards = {name: read_card(p) for name, p in folders.items()}
    for name, card in cards.items():
        if name in SLOTS and slot(card) != name:
            raise ValueError(f"{folders[name]} holds a {slot(card)} probe but sits in the {name!r} slot of "
                             f"{where / GENERATOR_FILE}; name each probe under its own slot")
        if card.kind == "switch" and not {"switch_low", "switch_high"} <= set(card.thresholds):
            raise ValueError(f"{folders[name] / 'probe.json'} lacks its calibrated switch thresholds (calibration.thresholds."
                             "switch_low / switch_high); re-export the switch probe")
    if not set(cards) - {"switch"}:
        raise ValueError(f"{path}: a switch probe alone cannot steer; pair it with a difficulty probe (generator.json)")
    base = next(iter(cards.values())).base_model
    for name, card in cards.items():  # every probe must belong to the same base model
        if card.base_model.fingerprint != base.fingerprint:
            raise ProbeMismatch(f"probe {name!r} in {folders[name]} was trained on {card.base_model.name!r}, "
                                f"the others on {base.name!r}: a generator's probes must share one base model")
    if model is None:
        model = load_model(ModelSpec(name=base.name, dtype=dtype or base.dtype, device_map=device_map))
    elif not isinstance(model, LoadedModel):
        model = wrap(model, tokenizer)
    probes = {name: load_probe(p, model) for name, p in folders.items()}
    return where.resolve(), model, probes, steering


def load_probes(lm: LoadedModel, folders: list[str | Path | None]) -> dict:
    """Exported probe folders (``None`` entries skipped), loaded for ``lm``, by slot; two in one slot are refused."""
    probes = {}
    for where in filter(None, folders):
        probe = load_probe(where, lm)
        name = slot(probe.card)
        if name in probes:
            raise ValueError(f"{where}: a second {name} probe; a generator holds one per slot {SLOTS}")
        probes[name] = probe
    return probes


def save(path: str | Path, probes: dict, steering: SteeringSpec) -> Path:
    """Write a generator folder whole (staged, then renamed into place)."""
    meta = {"format": "kvprobe-generator", "kvprobe": kvprobe.__version__, "probes": {name: name for name in probes},
            "base_model": asdict(next(iter(probes.values())).card.base_model), "steering": asdict(steering)}
    with replace_folder(path, GENERATOR_FILE, set(SLOTS) | {GENERATOR_FILE}) as staging:
        for name, probe in probes.items():
            write_probe(probe, staging / name)
        (staging / GENERATOR_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)


def contained(where: Path, sub, name: str) -> Path:
    """The subfolder ``sub`` of generator folder ``where`` for slot ``name``: a relative path inside the folder, no
    link leading out of it (a tampered generator.json could otherwise load any probe on the disk)."""
    if not isinstance(sub, str) or not sub.strip():
        raise ValueError(f"{where / GENERATOR_FILE}: probes.{name} must name a subfolder, not {sub!r}")
    path = where / sub
    if Path(sub).is_absolute() or not path.resolve().is_relative_to(where.resolve()) or path.is_symlink():
        raise ValueError(f"{where / GENERATOR_FILE}: probes.{name} = {sub!r} leads outside the generator folder {where}; "
                         "a generator's probes must sit in its own subfolders (copy the probe in, or kvprobe assemble)")
    return path


def steering_spec(saved: dict, where: Path) -> SteeringSpec:
    """The steering settings a generator folder saved; unknown keys (another kvprobe version's) and bad values are
    named with the file."""
    known = {f.name for f in fields(SteeringSpec)}
    if unknown := sorted(set(saved) - known):
        raise ValueError(f"{where}: steering settings {unknown} are not SteeringSpec fields {sorted(known)}; this folder "
                         "was written by another kvprobe version: reassemble it with kvprobe assemble")
    try:
        return SteeringSpec(**saved)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}; fix the steering settings or reassemble the folder with kvprobe assemble") from None


def read_generator(path: Path) -> dict:
    """generator.json, checked: a damaged or foreign file is named with the command that rebuilds it."""
    fix = "rebuild it with kvprobe assemble (README.md)"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None
    probes = meta.get("probes") if isinstance(meta, dict) else None
    if not isinstance(probes, dict) or not probes or set(probes) - set(SLOTS):
        raise ValueError(f"{path} must name its probes as {{slot: subfolder}} with slots from {SLOTS}; {fix}")
    if not isinstance(meta.get("steering", {}), dict):
        raise ValueError(f"{path}: 'steering' must be an object of SteeringSpec settings; {fix}")
    return meta


def wrap(model, tokenizer) -> LoadedModel:
    """A transformers model and tokenizer as a LoadedModel; its fingerprint comes from the folder it was loaded from."""
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer too (tokenizer=...), or a kvprobe LoadedModel")
    source = getattr(model, "name_or_path", "") or ""
    try:
        _, digest = resolve(source)
    except (FileNotFoundError, ValueError):
        digest = "unknown"
    for_batches(tokenizer)
    spec = ModelSpec(name=source or type(model).__name__, dtype=str(model.dtype).removeprefix("torch."))
    return LoadedModel(model.eval(), tokenizer, spec, source, digest, model_shape(model.config))
