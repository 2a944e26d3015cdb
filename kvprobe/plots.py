"""Figures are drawn headless (to files and W&B): the one place that picks matplotlib's Agg backend."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (plotting is never on a hot path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
