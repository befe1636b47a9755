"""matplotlib for vitlab's pictures."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: vitlab writes its figures to PNG files and never opens a window, so
    plotting works the same on a headless machine (CI, a server over SSH). Imported on first use: matplotlib is
    only needed by the commands that draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
