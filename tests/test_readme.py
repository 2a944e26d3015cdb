"""The README's and the guide's Python blocks, run as written (in order, one namespace per file, in a scratch
folder), on the real SmolLM2. Two things are put in place first, as a reader would have them: the folder
`runs/my-study/generator` a study writes (here a tiny generator's), and a `kvprobe serve smollm2` on a free port
(the blocks' `http://127.0.0.1:8000` is pointed at it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import real_assets_available

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not real_assets_available(), reason="needs the SmolLM2 registry assets (scripts/setup.sh)")]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_readme_and_guide_have_python_blocks():
    assert len(python_blocks(REPO / "README.md")) >= 3 and len(python_blocks(REPO / "docs" / "guide.md")) >= 3


@pytest.mark.parametrize("doc", ["README.md", "docs/guide.md"])
def test_python_blocks_run_as_written(doc, trained, tmp_path, monkeypatch):
    from test_serve import serving

    from kvprobe import KVProbeGenerator
    from kvprobe.models import ModelSpec, load_model

    root = trained["root"]
    tiny = KVProbeGenerator.from_probes(load_model(ModelSpec(name=str(trained["model"]))), root / "difficulty", [root / "correctness"])
    tiny.save_pretrained(tmp_path / "runs" / "my-study" / "generator")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")  # the guide loads a shipped probe by its repo path
    smollm2 = KVProbeGenerator.from_pretrained("smollm2")
    namespace: dict = {}
    with serving(lambda: smollm2, path="smollm2") as (url, _):
        for i, block in enumerate(python_blocks(REPO / doc)):
            code = block.replace("http://127.0.0.1:8000", url)
            exec(compile(code, f"{doc} python block {i + 1}", "exec"), namespace)
    assert namespace, "nothing ran"
