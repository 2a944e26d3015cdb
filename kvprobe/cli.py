"""The ``kvprobe`` command: one entry point, a subcommand per job, each with its own ``--help``.

    kvprobe fit --config configs/coe.yaml       # = python -m kvprobe.fit ...
    kvprobe configs my-configs                  # copy the shipped configs out (outside the repo)
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable

COMMANDS = {  # name: (module whose main() runs it, what it does)
    "fit": ("kvprobe.fit", "train, calibrate, test and export a probe (--config configs/coe.yaml; --print_config)"),
    "capture": ("kvprobe.capture", "generate, grade and store the KV features of a task (--config configs/capture.yaml)"),
    "assemble": ("kvprobe.steering.assemble", "assemble a generator folder from exported probes"),
    "study": ("kvprobe.study.run", "capture a task in both modes, train the probes and their peers, and report what they pay off (--config configs/study.yaml)"),
    "serve": ("kvprobe.serve.run", "serve a generator folder over the OpenAI API (kvprobe serve smollm2 --port 8000)"),
    "evaluate": ("kvprobe.evaluate", "run the steering policies live on a data split and write the report"),
    "configs": ("kvprobe.cli", "copy the shipped YAML configs into a new folder: kvprobe configs DEST"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: kvprobe COMMAND [ARGS...]   (kvprobe COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def configs(argv: list[str]) -> None:
    import argparse

    from kvprobe.resources import copy_configs

    parser = argparse.ArgumentParser(prog="kvprobe configs", description=COMMANDS["configs"][1])
    parser.add_argument("dest", help="a new folder; then run kvprobe fit --config DEST/coe.yaml")
    dest = copy_configs(parser.parse_args(argv).dest)
    print(f"[kvprobe] configs copied to {dest}; run: kvprobe fit --config {dest / 'coe.yaml'}")


def check_config_files(argv: list[str]) -> None:
    """Every YAML file named on the command line (``--config F``, or any ``--opt F.yaml``) exists, is UTF-8 and holds
    something: jsonargparse would otherwise say "Unexpected config" or raise a bare decode error without the file."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if not flag.startswith("--") or not (flag == "--config" or value.endswith((".yaml", ".yml"))):
            continue
        path = Path(value).expanduser()
        if flag == "--config" and not path.is_file():
            raise FileNotFoundError(f"--config {value}: no such file")
        if not path.is_file():
            continue  # a path relative to an including config: jsonargparse resolves it
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 (byte {err.start}); save the file as UTF-8") from None
        if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
            raise ValueError(f"{path} is empty (or only comments): a config needs at least one setting")


def guarded(run: Callable[[], object], prog: str, argv: list[str]) -> int:
    """Run a command; a user's error (bad input, a missing or damaged file, another model's probe) becomes one line
    that names it, with the traceback behind ``--debug`` or ``KVPROBE_DEBUG=1``."""
    from kvprobe.assets import AssetError
    from kvprobe.store import CorruptCapture

    debug = "--debug" in argv or os.environ.get("KVPROBE_DEBUG", "") not in ("", "0")
    saved, sys.argv = sys.argv, [prog, *(a for a in argv if a != "--debug")]
    try:
        check_config_files(argv)
        run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; everything finished is kept (captured shards, exports written whole), and the same "
              "command resumes from there", file=sys.stderr)
        return 130
    except (ValueError, OSError, CorruptCapture, AssetError) as err:
        if debug:
            raise
        message = " ".join(str(err).split())
        print(f"{prog}: error: {message} ({type(err).__name__}; --debug or KVPROBE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved  # a caller inside Python (a test, a notebook) keeps its own command line
    return 0


def run_module(run: Callable[[], object], prog: str) -> None:
    """``python -m kvprobe.X``: the same error handling as ``kvprobe X``."""
    sys.exit(guarded(run, prog, sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kvprobe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "configs":
        return guarded(lambda: configs(sys.argv[1:]), "kvprobe configs", rest)
    # each command parses sys.argv itself (LightningCLI warns when given both); its usage then reads "kvprobe NAME"
    return guarded(importlib.import_module(COMMANDS[name][0]).main, f"kvprobe {name}", rest)


if __name__ == "__main__":
    sys.exit(main())
