"""Each benchmark runs once, reduced, on a tiny model: they must keep working. No timing is asserted."""

import importlib.util
import json
from pathlib import Path


def load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capture_overhead_reduced(tiny_models, tmp_path):
    out = tmp_path / "capture_overhead.json"
    figures = load("capture_overhead").main(["--model", str(tiny_models["llama"]), "--n", "6", "--batch-size", "3",
                                             "--max-new-tokens", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == figures
    assert figures["capture_over_generate"] > 0 and figures["hidden_state_bytes_on_disk"] > figures["kvprobe_bytes_on_disk"]
