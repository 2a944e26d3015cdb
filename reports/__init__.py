"""The reports in docs/ and the experiments behind them: repo tooling, not part of the kvprobe package.

Each module has a ``main()`` and runs from the repository root, e.g. ``python -m reports.correctness``; each uses
only kvprobe's public API. See README.md (Layout) for the list.
"""
