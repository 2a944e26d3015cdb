"""device_map="auto": the model-parallel path gives the plain CPU path's features.

On a CPU-only machine "auto" places every layer on the CPU (the argument path is still exercised); the GPU test,
skipped without CUDA, runs the layers on the GPU and gathers their caches for pooling.
"""

import pytest
import torch
from safetensors.torch import load_file

from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec
from kvprobe.tasks import TaskSpec

def spec(model: ModelSpec) -> CaptureSpec:
    return CaptureSpec(model, TaskSpec("arithmetic", params={"n": 6}), generation=GenerationSpec(max_new_tokens={"fast": 4, "slow": 8}, batch_size=3),
                       features=FeatureSpec(prompt_window=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, auto places the layers there (the GPU test below)")
def test_device_map_auto_on_cpu_matches_plain(tiny_models, tmp_path):
    plain = capture(spec(ModelSpec(name=str(tiny_models["qwen2"]))), tmp_path / "plain", verbose=False)
    auto = capture(spec(ModelSpec(name=str(tiny_models["qwen2"]), device_map="auto")), tmp_path / "auto", verbose=False)
    a, b = load_file(plain.path / "shard-00000.safetensors"), load_file(auto.path / "shard-00000.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_map_auto_on_gpu_matches_cpu(tiny, tmp_path):
    cpu = capture(spec(ModelSpec(name=str(tiny))), tmp_path, verbose=False)
    gpu = capture(spec(ModelSpec(name=str(tiny), device_map="auto")), tmp_path / "gpu", verbose=False)
    a, b = load_file(cpu.path / "shard-00000.safetensors"), load_file(gpu.path / "shard-00000.safetensors")
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2e-3, atol=2e-3)
