"""Shipped files are found from anywhere (aliases, configs), and the kvprobe command dispatches to each job."""

import subprocess
import sys

import pytest

from kvprobe import cli, resources


def test_an_alias_names_the_shipped_generator_and_a_same_named_folder_is_named_not_loaded(tmp_path, monkeypatch):
    assert resources.aliases() == ["qwen2.5-coder-0.5b", "smollm2"]
    monkeypatch.chdir(tmp_path)
    assert resources.resolve_generator("smollm2") == resources.PRETRAINED / "smollm2"
    (tmp_path / "smollm2").mkdir()
    with pytest.warns(UserWarning, match=r"'smollm2' is the shipped generator .* the folder .*smollm2 in the working "
                                         r"directory was not \(pass './smollm2' to load it\)"):
        assert resources.resolve_generator("smollm2") == resources.PRETRAINED / "smollm2"
    assert resources.resolve_generator("./smollm2").resolve() == tmp_path / "smollm2"
    assert resources.resolve_generator("~/gen") == resources.Path.home() / "gen"


def test_configs_are_found_and_copied_out(tmp_path):
    assert (resources.configs_dir() / "coe.yaml").is_file()
    dest = resources.copy_configs(tmp_path / "cfg")
    assert {p.name for p in dest.iterdir()} >= {"coe.yaml", "data", "model", "trainer", "logger"}
    with pytest.raises(FileExistsError, match="not empty"):
        resources.copy_configs(dest)


def test_the_kvprobe_command(tmp_path, capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in cli.COMMANDS)
    assert cli.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    assert cli.main(["configs", str(tmp_path / "cfg")]) == 0 and (tmp_path / "cfg" / "coe.yaml").is_file()
    assert cli.main(["configs", str(tmp_path / "cfg")]) == 2 and "not empty" in capsys.readouterr().err
    for name in ("fit", "capture", "study", "assemble", "evaluate"):  # each job answers --help through the command
        done = subprocess.run([sys.executable, "-m", "kvprobe.cli", name, "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and f"kvprobe {name}" in done.stdout, (name, done.stderr[-2000:])


def test_python_m_kvprobe_is_the_kvprobe_command():
    """``python -m kvprobe`` prints the same usage as ``kvprobe`` (the console script calls the same main)."""
    done = subprocess.run([sys.executable, "-m", "kvprobe", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == cli.usage() + "\n"


def test_the_top_level_is_the_design_cards():
    """The repository's top level: the card's rooms plus the project's tooling folders, nothing else."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    top = {name.split("/")[0] for name in tracked}
    assert top == {"kvprobe", "datamodules", "configs", "tests", "checkpoints", "pyproject.toml", "README.md",
                   "docs", "reports", "benchmarks", "scripts", ".ci", ".gitignore"}
