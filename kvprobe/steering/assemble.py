"""``kvprobe assemble``: a generator folder from exported probes."""

from __future__ import annotations

from pathlib import Path

from kvprobe.export import read_card
from kvprobe.models import ModelSpec, load_model
from kvprobe.steering.config import SteeringSpec
from kvprobe.steering.generator import KVProbeGenerator


def main(argv: list[str] | None = None) -> Path:
    """Assemble a generator folder from exported probes: ``kvprobe assemble --difficulty D --correctness C --out O``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="kvprobe assemble", description=main.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_argument("--difficulty", type=str | None, default=None, help="exported difficulty probe folder (kvprobe fit --config configs/difficulty.yaml)")
    parser.add_argument("--correctness", type=str | None, default=None, help="exported correctness probe folder (slow answers)")
    parser.add_argument("--correctness_fast", type=str | None, default=None,
                        help="exported correctness probe on fast answers: the verify policies' verifier (configs/verifier.yaml)")
    parser.add_argument("--switch", type=str | None, default=None, help="exported switch probe folder (kvprobe fit --config configs/switch.yaml)")
    parser.add_argument("--out", type=str, required=True, help="generator folder to write")
    parser.add_argument("--threshold", type=float | str, default=SteeringSpec.threshold,
                        help="the difficulty score that routes to slow: a calibrated threshold's name, or a number")
    args = parser.parse_args(argv)
    first = args.difficulty or args.correctness or args.correctness_fast
    if not first:
        parser.error("give --difficulty and/or --correctness")
    base = read_card(first).base_model
    lm = load_model(ModelSpec(name=base.name, dtype=base.dtype))
    gen = KVProbeGenerator.from_probes(lm, args.difficulty, [args.correctness, args.correctness_fast], args.switch,
                                       SteeringSpec(threshold=args.threshold))
    out = gen.save_pretrained(args.out)
    print(f"[kvprobe] generator for {base.name} written to {out}")
    return out


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe assemble")
