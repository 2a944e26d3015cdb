"""Capture: generate -> grade -> KV features -> store. One process, data-parallel, or sharded over GPUs.

    kvprobe capture --config configs/capture.yaml                       # the embedded model on arithmetic
    kvprobe capture --capture configs/captures/qwen_mix.yaml --modes '[fast, slow]' --devices 2

Nothing hooks the model: the KV cache is an ordinary output of ``generate``, and features are pooled from that
very cache (a second forward pass would cost 5-6% of generation time; pooling costs ~0.05%).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import kvprobe
from kvprobe.features import FeatureSpec, OutputStats, pooled_hidden, pooled_response, prompt_window, token_trajectory
from kvprobe.assets import cache_dir
from kvprobe.cache import layer_kv
from kvprobe.decoding import DrawTokens, row_generators
from kvprobe.models import LoadedModel, ModelSpec, eos_ids, last_logits_only, left_pad, load_model, load_tokenizer, locate, model_shape
from kvprobe.prompts import PromptSpec, check_token_caps, prompt_ids
from kvprobe.store import CaptureStore, spec_digest
from kvprobe.tasks import GRADING_VERSION, Item, TaskError, TaskSpec, default_caps, grader_of, load_items
from kvprobe.typecheck import check_fields


@dataclass
class GenerationSpec:
    """How answers are generated.

    Args:
        max_new_tokens: cap per mode (fast answers are short; step-by-step ones need room); ``null`` = the task's
            default (``kvprobe.tasks.default_caps``: slow 512 for GSM8K, 256 otherwise; fast 32).
        batch_size: prompts per ``generate`` call (left-padded). Part of the fingerprint: padding changes
            floating-point sums at the 1e-6 level, which can flip a greedy token.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus sampling mass (only with ``do_sample``).
        seed: sampling seed: sample ``j`` of each question draws from its own generator seeded ``seed + j``, as the
            live engine seeds it, so the same tokens come out in any batch, shard or process.
        shard_size: items per shard on disk: the unit of resume and of data-parallel work.
        samples: answers per question (with ``do_sample``): stored as rows that keep the question's id and their
            ``sample`` index, next to each other; splits are by question, so a question's samples stay together.
    """

    max_new_tokens: dict[str, int] | None = None
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    shard_size: int = 64
    samples: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_token_caps(self.max_new_tokens, "generation.max_new_tokens")
        for name in ("batch_size", "shard_size", "samples"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"generation.{name} must be a whole number >= 1, not {value!r}")
        check_fields(self, "generation")  # the other fields' types, named as they are read
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, not {self.temperature!r}, {self.top_p!r}")
        if self.samples > 1 and not self.do_sample:
            raise ValueError(f"generation.samples {self.samples} needs do_sample: true (greedy answers would all be the same)")


@dataclass
class CaptureSpec:
    """What a capture stores: which model answers which questions, prompted and decoded how, keeping which features.
    Everything here enters the capture's fingerprint; where the capture lives does not.

    Args:
        model: the frozen model (embedded alias, local HF folder, .gguf file or hub id) and how to load it.
        task: the questions (any of ``kvprobe.tasks.TASKS``).
        prompt: how a question becomes a prompt, including the mode (fast/slow) and the instruction texts.
        generation: decoding settings, token caps, batch size and shard size.
        features: what KV-derived tensors are stored per answer.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    features: FeatureSpec = field(default_factory=FeatureSpec)

    def in_mode(self, mode: str, task: TaskSpec | None = None) -> "CaptureSpec":
        """The same capture with prompts in ``mode`` (and, if given, another ``task``)."""
        return dataclasses.replace(self, prompt=dataclasses.replace(self.prompt, mode=mode), task=task or self.task)


CAP_WARNING = 0.10  # above this share of answers cut by the token cap, a capture's labels are mostly "did it finish"


@dataclass
class CaptureResult:
    path: Path
    summary: dict


def capture_spec(model: ModelSpec, source: str, digest: str, task: TaskSpec, prompt: PromptSpec, gen: GenerationSpec,
                 feats: FeatureSpec, items: list[Item]) -> dict:
    """Everything that changes what is stored. Its hash names the capture folder. Loads no weights.

    ``source`` and ``digest`` are ``kvprobe.models.locate(model)``: what to load, and its content hash.
    ``items`` enter as a digest of their ids, questions, golds and choices: a task file edited in place, or the
    same relative path in another folder, names another capture.
    """
    from transformers import AutoConfig

    return {
        "kvprobe": kvprobe.__version__,
        "shape": asdict(model_shape(AutoConfig.from_pretrained(source))),
        "grading": GRADING_VERSION,
        "model": {"fingerprint": digest, "dtype": model.dtype, "name": model.name},
        "task": {k: v for k, v in asdict(task).items() if k != "grader" or v is not None},  # the default leaves no trace
        "items": items_digest(items),
        "prompt": prompt.to_dict(),
        # one answer per question leaves no trace, so captures from before ``samples`` existed keep their names
        "generation": {k: v for k, v in asdict(gen).items() if k != "samples" or v != 1}
        | ({"sampler": "kvprobe.decoding"} if gen.do_sample else {}),  # it once was transformers' own
        "features": feats.to_dict(),
    }


def items_digest(items: list[Item]) -> str:
    rows = [[item.qid, item.question, item.gold, list(item.choices) if item.choices else None] for item in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _validate(items: list[Item], ids: list[list[int]], limit: int | None, max_new: int) -> None:
    for item, prompt in zip(items, ids):
        if limit and len(prompt) + max_new > limit:
            raise TaskError(
                f"item {item.qid}: prompt of {len(prompt)} tokens + max_new_tokens {max_new} exceeds the model's "
                f"context of {limit}; shorten the question, lower generation.max_new_tokens, or drop the item"
            )


def generate_batch(lm: LoadedModel, batch: list[list[int]], gen: GenerationSpec, max_new: int, feats: FeatureSpec,
                   seeds: list[int] | None = None):
    """One left-padded ``generate`` call over prompt ids ``batch``: (output with the cache, new ids, answer lengths,
    finished-before-the-cap flags, output statistics, prompt width). With ``do_sample`` row ``i`` draws its tokens
    from a generator seeded ``seeds[i]`` (``kvprobe.decoding``: the sampler the live engine uses)."""
    from transformers import GenerationConfig, LogitsProcessorList

    tok = lm.tokenizer
    input_ids, mask = left_pad(batch, tok.pad_token_id)
    width = input_ids.shape[1]
    eos = eos_ids(lm)
    config = GenerationConfig(  # greedy over DrawTokens' scores when sampling: it leaves one token finite per row
        max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos,
        return_dict_in_generate=True, output_hidden_states=feats.hidden_states,
    )
    stats = OutputStats()  # first: it sees the model's own distribution
    device = lm.input_device
    processors = [stats]
    if gen.do_sample:
        processors.append(DrawTokens(row_generators(seeds, device), gen.temperature, 0, gen.top_p))
    out = lm.model.generate(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config,
        logits_processor=LogitsProcessorList(processors), **last_logits_only(lm.model),
    )
    new = out.sequences[:, width:].cpu()
    is_eos = torch.isin(new, torch.tensor(eos))
    finished = is_eos.any(1)
    lengths = torch.where(finished, is_eos.int().argmax(1) + 1, torch.full_like(finished, new.shape[1], dtype=torch.long))
    return out, new, lengths, finished, stats, width


def answer_features(out, width: int, lengths: torch.Tensor, prompt_lengths: torch.Tensor, lm: LoadedModel, feats: FeatureSpec):
    """The stored tensors of a generated batch, from its cache (and hidden states): what ``feats`` asks for, and the
    per-token trajectory (or None)."""
    pairs = layer_kv(out, device=lm.input_device)
    tensors = {"response_kv": pooled_response(pairs, width, lengths)}
    if feats.prompt_window:
        window = prompt_window(pairs, width, prompt_lengths, feats.prompt_window, feats.layer_ids(len(pairs)))
        tensors["prompt_kv"] = window.half()
    if feats.hidden_states:
        tensors["hidden"] = pooled_hidden(out.hidden_states, lengths)
    trajectory = token_trajectory(pairs, width, lengths) if feats.token_trajectory else None
    return {k: v.cpu() for k, v in tensors.items()}, trajectory


def _run_shard(lm, items, ids, seeds, gen, feats, prompt, grader, progress) -> tuple[dict, list[dict]]:
    """Generate, grade and featurise one shard's items (item ``i`` sampled from seed ``seeds[i]``); returns its
    tensors and table rows in item order."""
    max_new = gen.max_new_tokens[prompt.mode]
    order = sorted(range(len(items)), key=lambda i: -len(ids[i]))  # similar lengths batch with little padding
    parts: dict[int, tuple] = {}
    for start in range(0, len(order), gen.batch_size):
        chunk = order[start : start + gen.batch_size]
        prompt_lengths = torch.tensor([len(ids[i]) for i in chunk])
        out, new, lengths, finished, stats, width = generate_batch(lm, [ids[i] for i in chunk], gen, max_new, feats,
                                                                    [seeds[i] for i in chunk])
        tensors, trajectory = answer_features(out, width, lengths, prompt_lengths, lm, feats)
        max_prob, entropy = stats.means(lengths)
        del out
        for b, i in enumerate(chunk):
            n = int(lengths[b])
            response = lm.tokenizer.decode(new[b, :n], skip_special_tokens=True)
            prediction, correct = grader(items[i], response, prompt.mode)
            row = {
                "qid": items[i].qid, "question": items[i].question, "gold": items[i].gold,
                "choices": json.dumps(items[i].choices) if items[i].choices else None,
                "mode": prompt.mode, "response": response, "prediction": prediction, "correct": correct,
                "extracted": prediction != "", "gen_tokens": n, "finished": bool(finished[b]),
                "prompt_tokens": len(ids[i]), "model": lm.spec.name,
            }
            if feats.output_stats:
                row |= {"max_prob": float(max_prob[b]), "entropy": float(entropy[b])}
            item_tensors = {k: v[b] for k, v in tensors.items()}
            if trajectory is not None:
                item_tensors["token_kv"] = trajectory[b].half()
            parts[i] = (item_tensors, row)
        progress.tokens += int(lengths.sum())
        progress.set_postfix(tok_s=f"{progress.tokens / max(1e-9, time.perf_counter() - progress.t0):.0f}", refresh=False)
        progress.update(len(chunk))
    rows = [parts[i][1] for i in range(len(items))]
    names = parts[0][0].keys()
    shard = {}
    for name in names:
        if name == "token_kv":
            seqs = [parts[i][0][name] for i in range(len(items))]
            shard["token_kv"] = torch.cat(seqs)
            shard["token_offsets"] = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        else:
            shard[name] = torch.stack([parts[i][0][name] for i in range(len(items))])
    return shard, rows


def capture(
    spec: CaptureSpec | None = None,
    root: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    loaded: LoadedModel | None = None,
    verbose: bool = True,
) -> CaptureResult:
    """Capture a task's answers and KV features into the store; reruns with the same fingerprint do no model work.

    With ``world_size > 1`` each rank captures the shards ``j % world_size == rank`` and rank 0 merges the table.
    """
    spec = spec or CaptureSpec()
    model, task, prompt, generation, features = spec.model, spec.task, spec.prompt, spec.generation, spec.features
    if generation.max_new_tokens is None:  # recorded resolved, so the fingerprint says what was used
        generation = dataclasses.replace(generation, max_new_tokens=default_caps(task))
    if prompt.mode not in generation.max_new_tokens:
        raise ValueError(f"generation.max_new_tokens has no entry for mode {prompt.mode!r}: {generation.max_new_tokens}")
    barrier = barrier or (lambda: None)
    items = load_items(task)  # bad task input fails here, before any model work
    grader = grader_of(task)
    model = loaded.spec if loaded else model
    source, model_digest = (loaded.source, loaded.fingerprint) if loaded else locate(model)
    record = capture_spec(model, source, model_digest, task, prompt, generation, features, items)
    items = [item for item in items for _ in range(generation.samples)]  # a question's samples, side by side
    digest = spec_digest(record)
    store = CaptureStore(Path(root or cache_dir() / "captures") / f"{task.name}-{prompt.mode}-{digest[:16]}")
    if not store.complete and rank == 0:
        _adopt_older(store, record | {"fingerprint": digest}, items, grader, verbose)
    barrier()
    if store.complete and not store.verify():
        if rank == 0:
            store.begin(record | {"fingerprint": digest})  # rewrites a damaged spec.json, else nothing
        return _finish(store, verbose and rank == 0, reused=True)
    tokenizer = loaded.tokenizer if loaded else load_tokenizer(source)
    ids = [prompt_ids(item, prompt, tokenizer) for item in items]
    _validate(items, ids, record["shape"]["max_positions"], generation.max_new_tokens[prompt.mode])

    shards = [range(s, min(s + generation.shard_size, len(items))) for s in range(0, len(items), generation.shard_size)]
    mine = [j for j in range(len(shards)) if j % world_size == rank]
    todo = [j for j in mine if not store.shard_ok(j)]
    lm = loaded or (load_model(model) if todo else None)  # only a merge left to do: no weights needed
    store.begin(record | {"fingerprint": digest})  # the folder appears once everything before work has passed
    progress = tqdm(
        total=sum(len(shards[j]) for j in todo), desc=f"capture {task.name}/{prompt.mode}" + (f" [rank {rank}]" if world_size > 1 else ""),
        unit="item", disable=not verbose or not todo, position=rank,
    )
    progress.tokens, progress.t0 = 0, time.perf_counter()
    for j in todo:
        t0 = time.perf_counter()
        with torch.inference_mode():
            tensors, rows = _run_shard(lm, [items[i] for i in shards[j]], [ids[i] for i in shards[j]],
                                       [generation.seed + i % generation.samples for i in shards[j]], generation,
                                       features, prompt, grader, progress)
        for r, i in zip(rows, shards[j]):
            r["index"] = i
            if generation.samples > 1:
                r["sample"] = i % generation.samples
        store.write_shard(j, tensors, rows, time.perf_counter() - t0)
    progress.close()
    barrier()
    if rank == 0:
        missing = [j for j in range(len(shards)) if not store.shard_ok(j)]
        if missing:
            raise RuntimeError(f"shards {missing} were not written by their ranks; rerun the capture to finish them")
        store.finalize(len(shards), _summary(store, len(shards), store.seconds(len(shards))))
    barrier()
    return _finish(store, verbose and rank == 0, reused=False)


def _older_specs(spec: dict):
    """(grading version, spec) an older kvprobe wrote for this very capture: earlier grading versions, and specs
    from before the items digest entered the fingerprint (the questions are then compared row by row)."""
    base = {k: v for k, v in spec.items() if k != "fingerprint"}
    for version in range(spec["grading"], 0, -1):
        for with_items in (True, False):
            old = base | {"grading": version}
            if not with_items:
                old.pop("items", None)
            if old != base:
                yield version, old


def _adopt_older(store: CaptureStore, spec: dict, items: list[Item], grader, verbose: bool) -> None:
    """Adopt a complete capture of the same spec that an older kvprobe wrote (another ``GRADING_VERSION``, or no
    items digest): its answers and tensors are what this run would generate, so its rows are graded again and
    nothing is regenerated. A grading fix then costs seconds, not hours of generation. Only when it holds exactly
    this task's questions; an intact older folder is left as it was (a damaged one is treated as any damaged
    capture: its bad shards are removed and it is not adopted)."""
    for version, old_spec in _older_specs(spec):
        older = CaptureStore(store.path.with_name(f"{store.path.name.rsplit('-', 1)[0]}-{spec_digest(old_spec)[:16]}"))
        if not older.complete or older.verify():
            continue
        n = len(older.manifest()["shards"])
        tables = [older.rows_of(j) for j in range(n)]
        rows = [r for t in tables for r in t]
        if len(rows) != len(items) or any((items[r["index"]].qid, items[r["index"]].question, items[r["index"]].gold)
                                          != (r["qid"], r["question"], r["gold"]) for r in rows):
            continue  # other questions under the same task spec: generate afresh
        break
    else:
        return
    store.begin(spec)
    shards, _ = older.open()
    summary = older.manifest()["summary"]
    for j, (tensors, rows) in enumerate(zip(shards, tables)):
        for row in rows:
            prediction, correct = grader(items[row["index"]], row["response"], spec["prompt"]["mode"])
            row.update(prediction=prediction, correct=correct, extracted=prediction != "")
        store.write_shard(j, tensors, rows, summary["capture_seconds"] / n)  # the generation it came from
    store.finalize(n, _summary(store, n, summary["capture_seconds"]) | {"regraded_from": older.path.name})
    if verbose:
        print(f"[kvprobe] {older.path.name} holds these questions' answers (grading version {version}): regraded into "
              f"{store.path.name} (accuracy {summary['accuracy']:.1%} -> {store.manifest()['summary']['accuracy']:.1%}), "
              "nothing regenerated", flush=True)


def _summary(store: CaptureStore, n_shards: int, seconds: float) -> dict:
    rows = store.rows(n_shards)
    correct = sum(r["correct"] for r in rows)
    return {
        "items": len(rows), "correct": correct, "accuracy": correct / len(rows),
        "extraction_failures": sum(not r["extracted"] for r in rows),
        "unfinished": sum(not r["finished"] for r in rows),
        "cap_share": round(sum(not r["finished"] for r in rows) / len(rows), 4),
        "mean_gen_tokens": sum(r["gen_tokens"] for r in rows) / len(rows),
        "capture_seconds": round(seconds, 1),
    }


def _finish(store: CaptureStore, verbose: bool, reused: bool) -> CaptureResult:
    summary = store.manifest()["summary"] | {"bytes_on_disk": store.bytes_on_disk(), "reused": reused}
    if verbose:
        s = summary
        print(
            f"[kvprobe] {store.path.name}: {s['items']} items, accuracy {s['accuracy']:.1%} "
            f"({s['correct']} correct / {s['items'] - s['correct']} wrong), {s['extraction_failures']} unextracted, "
            f"{s['unfinished']} hit the token cap, {s['mean_gen_tokens']:.0f} tokens/answer, "
            f"{s['capture_seconds']} s{' (reused from cache)' if reused else ''}, "
            f"{s['bytes_on_disk'] / 1e6:.1f} MB on disk -> {store.path}",
            flush=True,
        )
    if verbose and summary.get("cap_share", 0) > CAP_WARNING:
        spec = store.spec()
        mode, caps = spec["prompt"]["mode"], spec["generation"]["max_new_tokens"]
        print(f"[kvprobe] WARNING: {summary['cap_share']:.0%} of the answers ({summary['unfinished']} of {summary['items']}) "
              f"hit the token cap generation.max_new_tokens.{mode}={caps[mode]} and are graded wrong: the labels mostly say "
              f"'did not finish'. Raise the cap (capture.generation.max_new_tokens, e.g. "
              f"'{json.dumps(caps | {mode: caps[mode] * 2})}') and capture again.", flush=True)
    return CaptureResult(store.path, summary)


def _capture_rank(fabric, specs: list[CaptureSpec], root: str | None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // fabric.world_size))  # share the cores, don't fight
    for spec in specs:
        capture(spec, root, fabric.global_rank, fabric.world_size, fabric.barrier)


def main(argv: list[str] | None = None) -> list[CaptureResult]:
    """Capture a task's answers and KV features (``kvprobe capture --help``)."""
    from typing import Literal

    from jsonargparse import ActionConfigFile, ArgumentParser

    from kvprobe.prompts import MODES

    parser = ArgumentParser(prog="kvprobe capture", description="Capture answers and KV features of a task.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with a `capture:` section (configs/capture.yaml)")
    parser.add_class_arguments(CaptureSpec, "capture")
    parser.add_argument("--modes", type=list[Literal[MODES]] | None, default=None,
                        help="capture in these modes (e.g. [fast, slow] for difficulty data); null = capture.prompt.mode")
    parser.add_argument("--cache_dir", type=str | None, default=None, help="null = $KVPROBE_CACHE/captures")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel processes (gloo on CPU, one GPU each on CUDA)")
    cfg = parser.parse_args(argv)
    if cfg.devices < 1:
        raise ValueError(f"--devices must be a number of processes >= 1, not {cfg.devices}")
    spec = parser.instantiate(cfg).capture
    specs = [spec.in_mode(m) for m in cfg.modes or [spec.prompt.mode]]
    if cfg.devices > 1:
        from lightning.fabric import Fabric

        Fabric(accelerator="auto", devices=cfg.devices, strategy="ddp_spawn").launch(_capture_rank, specs, cfg.cache_dir)
    return [capture(s, cfg.cache_dir) for s in specs]  # complete now: reads the manifest and prints the summary


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe capture")
