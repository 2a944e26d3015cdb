"""GPU-only: model-parallel capture with device_map="auto" gives the CPU's features. Skipped without CUDA."""

import pytest
import torch
from safetensors.torch import load_file

from kvprobe.capture import GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec
from kvprobe.tasks import TaskSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_map_auto_matches_cpu(tiny, tmp_path):
    kw = dict(task=TaskSpec("arithmetic", params={"n": 6}), generation=GenerationSpec(max_new_tokens={"fast": 4, "slow": 8}, batch_size=3),
              features=FeatureSpec(prompt_window=4), root=tmp_path, verbose=False)
    cpu = capture(model=ModelSpec(name=str(tiny)), **kw)
    gpu = capture(model=ModelSpec(name=str(tiny), device_map="auto"), root=tmp_path / "gpu", **{k: v for k, v in kw.items() if k != "root"})
    a, b = load_file(cpu.path / "shard-00000.safetensors"), load_file(gpu.path / "shard-00000.safetensors")
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2e-3, atol=2e-3)
