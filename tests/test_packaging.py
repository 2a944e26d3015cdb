"""The package works once installed: build the wheel, install it (no network) into a fresh environment, and use it
from a folder outside the repository, as a user who ran ``pip install kvprobe`` would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import real_assets_available

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "kvprobe", "datamodules", "configs", "checkpoints")


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel of the source, installed into a new virtual environment that sees this one's dependencies only."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves no build/ or egg-info in the repo
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "dist"), str(src)], root)
    wheel = next((root / "dist").glob("kvprobe-*.whl"))
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    # this environment's packages as plain path entries: its own .pth files (the editable kvprobe) are not read
    (site / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], root)
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"wheel": wheel, "python": python, "bin": venv / "bin", "site": site, "cwd": outside, "env": env}


def test_wheel_holds_every_subpackage_the_configs_and_the_shipped_generators(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for top in ("kvprobe", "datamodules"):
        for init in (REPO / top).rglob("__init__.py"):
            assert str(init.relative_to(REPO)) in names, f"{init.parent.relative_to(REPO)} is missing from the wheel"
    assert {"kvprobe/configs/coe.yaml", "kvprobe/configs/data/arithmetic.yaml", "kvprobe/configs/trainer/cpu.yaml"} <= names
    for alias in ("smollm2", "qwen2.5-coder-0.5b"):
        assert f"kvprobe/pretrained/{alias}/generator.json" in names
        assert f"kvprobe/pretrained/{alias}/difficulty/probe.safetensors" in names


def test_installed_package_imports_from_outside_the_repo(installed):
    out = run([str(installed["python"]), "-c",
               "import kvprobe, kvprobe.probes.correctness\nfrom kvprobe import KVProbeGenerator, load_probe\n"
               "from kvprobe.resources import aliases, configs_dir\nprint(kvprobe.__file__); print(configs_dir()); print(aliases())"],
              installed["cwd"], installed["env"]).stdout.splitlines()
    assert out[0].startswith(str(installed["site"])), "kvprobe was imported from the source tree, not the installed wheel"
    assert out[1] == str(installed["site"] / "kvprobe" / "configs")
    assert out[2] == "['qwen2.5-coder-0.5b', 'smollm2']"


def test_console_script_copies_the_configs_and_parses_the_main_job(installed):
    kvprobe, cwd, env = str(installed["bin"] / "kvprobe"), installed["cwd"], installed["env"]
    usage = run([kvprobe, "--help"], cwd, env).stdout
    assert "fit" in usage and "study" in usage and "serve" in usage
    assert run([str(installed["python"]), "-m", "kvprobe", "--help"], cwd, env).stdout == usage  # one program
    assert "--capture.task.limit" in run([kvprobe, "study", "--help"], cwd, env).stdout
    assert "--max-batch-size" in run([kvprobe, "serve", "--help"], cwd, env).stdout
    run([kvprobe, "configs", "my-configs"], cwd, env)
    assert (cwd / "my-configs" / "coe.yaml").is_file() and (cwd / "my-configs" / "model" / "coe_kv.yaml").is_file()
    config = run([kvprobe, "fit", "--config", "my-configs/coe.yaml", "--print_config"], cwd, env).stdout
    assert "class_path: kvprobe.probes.CorrectnessProbe" in config and "export_dir: null" in config
    refused = subprocess.run([kvprobe, "configs", "my-configs"], cwd=cwd, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "not empty" in refused.stderr


@pytest.mark.integration
@pytest.mark.skipif(not real_assets_available(), reason="needs the embedded SmolLM2 (scripts/setup.sh)")
def test_installed_from_pretrained_finds_the_shipped_generator_and_names_a_shadowing_folder(installed):
    cwd = installed["cwd"] / "shadow"
    (cwd / "smollm2").mkdir(parents=True)  # e.g. a user's own model folder of that name
    code = ("import warnings\nfrom kvprobe import KVProbeGenerator\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n    gen = KVProbeGenerator.from_pretrained('smollm2')\n"
            "print(gen.path)\nprint(' | '.join(str(w.message) for w in caught if 'shipped generator' in str(w.message)))\n"
            "record = gen.generate('What is 2 + 3?', policy='route', max_new_tokens=6)\nprint(record.mode, record.tokens)")
    out = run([str(installed["python"]), "-c", code], cwd, installed["env"]).stdout.splitlines()
    assert out[0] == str(installed["site"] / "kvprobe" / "pretrained" / "smollm2")
    assert str(cwd / "smollm2") in out[1] and "./smollm2" in out[1]
    assert out[2].split()[0] in ("fast", "slow")
