"""Write ``docs/cascade.md`` (``.json``, ``.png``): route, answer fast, verify, escalate, on the seeded arithmetic mix.

    python -m reports.cascade      # = kvprobe study --config configs/study_mix.yaml; captures cached: ~25 min on 2 cores

The cascade report is the study (``kvprobe.study``) run on the mix: every figure, choice and threshold comes from
there, and ``configs/study_mix.yaml`` (whose ``report`` is docs/cascade) says which captures and budgets. Options
after the command override the config's fields, as for ``kvprobe study``.
"""

from __future__ import annotations

import sys

from kvprobe.study.run import main as study

CONFIG = "configs/study_mix.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)  # then the study's own options
    return study(["--config", CONFIG, *argv])


if __name__ == "__main__":
    main()
