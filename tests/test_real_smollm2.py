"""Integration: the real embedded SmolLM2-135M-Instruct on a handful of real GSM8K and ARC items."""

import re

import pyarrow.parquet as pq
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import real_assets_available
from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec
from kvprobe.tasks import TaskSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not real_assets_available(), reason="registry assets not installed (bash scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelSpec())  # the embedded default, converted once into the user cache


def by_hand_number(response: str) -> float | None:
    """An independent reading of a math answer: the last number in the text after the last 'answer'."""
    tail = response[response.lower().rfind("answer"):] if "answer" in response.lower() else response
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", tail)
    return float(numbers[-1].replace(",", "").rstrip(".")) if numbers else None


def test_embedded_model_shape(smol):
    assert (smol.shape.layers, smol.shape.kv_heads, smol.shape.head_dim) == (30, 3, 64)
    assert smol.fingerprint.startswith("gguf:b179c952")


def test_gsm8k_capture_end_to_end_and_grades_agree_by_hand(smol, tmp_path):
    result = capture(CaptureSpec(task=TaskSpec("gsm8k", limit=4), prompt=PromptSpec(mode="slow"),
                                 generation=GenerationSpec(max_new_tokens={"fast": 16, "slow": 160}, batch_size=4),
                                 features=FeatureSpec(hidden_states=True)), tmp_path, loaded=smol, verbose=False)
    rows = pq.read_table(result.path / "table.parquet").to_pylist()
    assert len(rows) == 4 and all(r["response"].strip() for r in rows)
    for r in rows:
        hand = by_hand_number(r["response"])
        assert r["correct"] == (hand is not None and hand == float(r["gold"])), r["response"]
    tensors = load_file(result.path / "shard-00000.safetensors")
    assert tensors["response_kv"].shape == (4, 30, 2, 3, 64) and torch.isfinite(tensors["response_kv"]).all()
    assert tensors["hidden"].shape == (4, 31, 576)
    assert tensors["prompt_kv"].shape == (4, 30, 2, 3, 8, 64)
    assert all(0 < r["max_prob"] <= 1 and r["entropy"] >= 0 for r in rows)


def test_arc_capture_grades_agree_by_hand(smol, tmp_path):
    result = capture(CaptureSpec(task=TaskSpec("arc_easy", limit=6), prompt=PromptSpec(mode="fast"), generation=GenerationSpec(batch_size=6)),
                     tmp_path, loaded=smol, verbose=False)
    rows = pq.read_table(result.path / "table.parquet").to_pylist()
    for r in rows:
        lines = [ln for ln in r["response"].splitlines() if re.match(r"\s*[A-E][.)]", ln)]
        stated = re.findall(r"answer is \(?([A-E])", r["response"], re.IGNORECASE)
        hand = stated[-1] if stated else lines[0].strip()[0] if len(lines) == 1 else ""
        if hand:  # where a reader can name the choice, the grader names the same one
            assert r["prediction"] == hand and r["correct"] == (hand == r["gold"]), r["response"]
        else:
            assert r["prediction"] in ("", *[c for c in "ABCDE"])


def test_fit_on_real_model_small_slice_one_epoch(tmp_path):
    from kvprobe.export import read_card
    from kvprobe.fit import main

    results = main([
        "--config", "configs/coe.yaml", "--data.capture.task.params", '{"n": 40, "seed": 7, "terms": 2, "digits": 1}',
        "--data.capture.generation.max_new_tokens", '{"fast": 16, "slow": 64}', "--data.split.train", "0.4",
        "--data.split.val", "0.2", "--data.split.test", "0.4", "--data.cache_dir", str(tmp_path / "captures"),
        "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"), "--export_dir", str(tmp_path / "export"),
    ])
    assert results["items"] == {"train": 16, "val": 8, "test": 16}
    probe = results["test"]["probe"]
    assert probe["auroc_lo"] <= probe["auroc"] <= probe["auroc_hi"] and "kv_coe_c_token" in results["test"]
    card = read_card(tmp_path / "export")  # the real model's stamp: its alias and the embedded weights' fingerprint
    assert card.base_model.name == "smollm2" and card.base_model.shape["layers"] == 30 and card.task.params["n"] == 40
    best = Path(results["best_checkpoint"])  # this run's own checkpoint, under a name no other run writes
    assert (tmp_path / "export" / "probe.safetensors").is_file() and best.parent == tmp_path / "ckpt" and best.is_file()
    assert best.name.startswith("best-") and best.name != "best.ckpt"
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/results.json"))


def test_shipped_generator_steers_real_questions(smol):
    """README example: the probe set shipped in checkpoints/smollm2 routes, switches and scores real answers."""
    from kvprobe.steering import KVProbeGenerator

    gen = KVProbeGenerator.from_pretrained("smollm2", model=smol)
    questions = ["What is 7 + 5?", "What is 9 * 8 - 6?", [{"role": "user", "content": "What is 3 * 4?"}]]
    results = gen.generate(questions, policy="route+switch", max_new_tokens={"fast": 16, "slow": 48})
    assert set(gen.correctness) == {"slow"}  # its correctness probe knows slow answers only
    for r, q in zip(results, questions):
        assert r.text.strip() and r.mode in ("fast", "slow") and 0.0 <= r.route_score <= 1.0
        assert (r.confidence is None) if r.mode == "fast" else 0.0 <= r.confidence <= 1.0  # no probe for direct answers
        assert r.decoded_tokens == len(r.token_ids) - r.cue_tokens and r.decoded_tokens <= 16 + 48
        assert (r.switched_at is None) == (r.final_mode == r.mode) and r.probe_seconds < r.seconds
    r = gen.generate("What is 7 + 5?", policy="fast")
    assert "12" in r.text and r.tokens["slow"] == 0  # SmolLM2 knows this one without thinking
    # README example: N samples from one prefill, chosen by the probe; the classes come from the grader
    best = gen.generate("What is 9 * 8 - 6?", policy="sample", samples=4, select="probe_vote", do_sample=True,
                        temperature=0.7, top_p=0.95, seed=0, max_new_tokens=48)
    assert len(best.samples) == 4 and best.prompt_tokens == len(gen.prompt_ids("What is 9 * 8 - 6?", "slow"))
    assert all(0.0 <= s.confidence <= 1.0 for s in best.samples) and best.decoded_tokens == sum(s.tokens for s in best.samples)
    assert best.chosen is None or best.answers[best.chosen] in {best.answers[s.answer] for s in best.samples if s.answer >= 0}
    assert best.text in {s.text for s in best.samples}
