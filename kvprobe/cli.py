"""The ``kvprobe`` command: one entry point, a subcommand per job, each with its own ``--help``.

    kvprobe fit --config configs/coe.yaml       # = python -m kvprobe.fit ...
    kvprobe configs my-configs                  # copy the shipped configs out (outside the repo)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module whose main() runs it, what it does)
    "fit": ("kvprobe.fit", "train, calibrate, test and export a probe (--config configs/coe.yaml; --print_config)"),
    "capture": ("kvprobe.capture", "generate, grade and store the KV features of a task (--config configs/capture.yaml)"),
    "assemble": ("kvprobe.steering", "assemble a generator folder from exported probes"),
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
        try:
            configs(rest)
        except OSError as err:
            print(f"kvprobe configs: {err}", file=sys.stderr)
            return 2
        return 0
    # each command parses sys.argv itself (LightningCLI warns when given both); its usage then reads "kvprobe NAME"
    sys.argv = [f"kvprobe {name}", *rest]
    importlib.import_module(COMMANDS[name][0]).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
