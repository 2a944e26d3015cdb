"""Each benchmark runs once, reduced, on a tiny model: they must keep working. No timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name):
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: its folder first, for `from common import emit`
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capture_overhead_reduced(tiny_models, tmp_path):
    out = tmp_path / "capture_overhead.json"
    figures = load("capture_overhead").main(["--model", str(tiny_models["llama"]), "--n", "6", "--batch-size", "3",
                                             "--max-new-tokens", "4", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    assert figures["capture_over_generate"] > 0 and figures["hidden_state_bytes_on_disk"] > figures["kvprobe_bytes_on_disk"]
    assert figures["kvprobe_peak_rss_bytes"] > 0 and figures["capture_peak_over_generate"] > 0
    assert figures["capture_libraries_rss_bytes"] > 0  # math-verify and pyarrow are not free to load
    assert figures["capture_peak_with_libraries_over_generate"] > figures["capture_peak_over_generate"]


def test_memory_bytes_reduced(tiny_models, tmp_path):
    out = tmp_path / "memory_bytes.json"
    figures = load("memory_bytes").main(["--model", str(tiny_models["qwen2"]), "--contexts", "16", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    short, long = figures["in_flight"]
    assert long["kv_cache_bytes"] == 4 * short["kv_cache_bytes"]  # the cache grows linearly with context
    per_token = figures["this_model_per_token"]  # fp32 tiny model: 3 layers, 2 KV heads x 16, hidden 64
    assert per_token["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4 and long["kv_cache_bytes"] == 64 * per_token["kv_bytes_per_token"]
    assert long["hidden_states_bytes"] == 64 * per_token["hidden_bytes_per_token"]
    assert figures["paper_models_per_token_bf16"]["Llama-3.1-8B"]["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2


def test_probe_cost_reduced(tiny_models, tmp_path):
    out = tmp_path / "probe_cost.json"
    figures = load("probe_cost").main(["--model", str(tiny_models["llama"]), "--windows", "4", "--steps", "2",
                                       "--train-items", "256", "--questions", "2", "--max-new", "6", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    assert [(r["kv"], r["window"], r["layers"]) for r in figures["live"]] == [("k", 4, 3), ("both", 4, 3)]
    assert figures["training"]["difficulty"]["examples_per_s"] > 0 and figures["training"]["correctness"]["items"] == 256
    assert figures["training"]["switch"]["items"] == 256
    e2e = figures["end_to_end"]
    assert e2e["questions"] == 2 and {e2e["shipped_kv"], "k", "both"} == {"k", "both"}
    for kv in ("k", "both"):
        (run,) = e2e[kv]["rounds"]
        assert run["decoded_tokens"] > 2 and 0 < run["probe_s"] < run["wall_s"] and e2e[kv]["probe_share_of_wall_median"] > 0


def test_capture_scaling_reduced(tiny_models, tmp_path):
    out = tmp_path / "capture_scaling.json"
    figures = load("capture_scaling").main(["--model", str(tiny_models["llama"]), "--items", "2", "4", "--lengths", "2", "4",
                                            "--parallel-items", "4", "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    assert [r["items"] for r in figures["by_items"]] == [2, 4] and figures["same_capture"]
    assert figures["max_abs_tensor_difference"] < 1e-4  # two processes store what one stores


def test_lm_head_slice_reduced(tiny_models, tmp_path):
    out = tmp_path / "lm_head_slice.json"
    figures = load("lm_head_slice").main(["--model", str(tiny_models["qwen2"]), "--dtype", "float32", "--rows", "2",
                                          "--prompt-tokens", "5", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == figures and figures["same_next_tokens"]
    assert figures["lm_head_strided_slice_s"] > 0 and figures["prefill_last_logits_only_s"] > 0


def test_sampling_throughput_reduced(tiny_models, tmp_path):
    out = tmp_path / "sampling_throughput.json"
    figures = load("sampling_throughput").main(["--model", str(tiny_models["llama"]), "--prompts", "2", "--samples", "3",
                                                "--max-new-tokens", "4", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    arms = figures["arms"]
    assert arms["kvprobe_sample"]["tokens"] == arms["hf_num_return_sequences"]["tokens"] == 2 * 3 * 4  # random text: no eos
    assert arms["kvprobe_greedy_loop"]["tokens"] == arms["hf_greedy"]["tokens"] and figures["sampling_over_hf"] > 0


def test_serve_load_reduced(trained, tmp_path):
    """The load run against a real `kvprobe serve` process on a tiny generator (transformers serve left out)."""
    from kvprobe.models import ModelSpec, load_model
    from kvprobe.steering import KVProbeGenerator

    root = trained["root"]
    lm = load_model(ModelSpec(name=str(trained["model"])))
    folder = KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness"]).save_pretrained(tmp_path / "gen")
    out = tmp_path / "serve_load.json"
    figures = load("serve_load").main(["--generator", str(folder), "--requests", "3", "--concurrency", "1", "2",
                                       "--max-tokens", "6", "--max-batch-size", "2", "--max-waiting", "2",
                                       "--long-tokens", "12", "--fill-tokens", "400", "--trials", "2", "--passes", "2", "--no-transformers",
                                       "--deadline", "300", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert figures["lost"] == 0 and figures["failed"] == 0 and figures["overload_5xx"] == 0
    assert figures["greedy_text_equal_in_process_c1"]  # the served greedy answers are the in-process ones
    over = figures["overload"]
    assert over["requests"] == 8 and over["ok"] + over["rejected_429"] == 8 and over["rejected_429"] >= 1
    assert over["with_retry_after"] == over["rejected_429"] and over["first_429_s"] <= over["last_429_s"]
    assert len(figures["overhead_passes"]) == 2 and figures["levels"][0]["passes"] == 2  # concurrency 1: interleaved
    assert [len(v) for v in figures["short_trials"].values()] == [2, 2]
    full = over["when_full"]  # a tiny model may finish its fill requests before the probes: refusals are not certain
    assert full["probes"] == 5 and full["with_retry_after"] == full["refused_429"] <= 5
    assert [r["requests"] for r in figures["levels"]] == [3, 3] and figures["throughput_c8_over_c1"] > 0


def test_live_loop_reduced(trained, tmp_path):
    """The live loop against the model's own steps, and a short answer joining an open batch, on a tiny generator."""
    from kvprobe.models import ModelSpec, load_model
    from kvprobe.steering import KVProbeGenerator

    root = trained["root"]
    lm = load_model(ModelSpec(name=str(trained["model"])))
    folder = KVProbeGenerator.from_probes(lm, root / "difficulty", [root / "correctness"]).save_pretrained(tmp_path / "gen")
    out = tmp_path / "live_loop.json"
    figures = load("live_loop").main(["--generator", str(folder), "--tokens", "6", "--short-tokens", "3", "--after", "2",
                                      "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert 1 <= figures["tokens"] <= 6 and set(figures["per_token"]) == {"kvprobe_ms", "model_generate_ms", "bare_steps_ms"}
    assert all(v > 0 for v in figures["per_token"].values()) and figures["short_joined_s"] > 0 and figures["short_alone_s"] > 0


def test_decode_step_reduced(tiny_models, tmp_path):
    out = tmp_path / "decode_step.json"
    figures = load("decode_step").main(["--model", str(tiny_models["llama"]), "--rows", "1", "2", "--steps", "2",
                                        "--prompt-tokens", "5", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(figures))
    for dtype in ("float32", "bfloat16"):
        assert written[dtype]["step_over_1_row"]["1"] == 1.0 and written[dtype]["step_ms"]["2"] > 0
