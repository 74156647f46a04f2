"""``gateskip reproduce``: the paper's ablation grid and baselines, one command, one table."""

from gateskip.reproduce.run import reproduce

__all__ = ["reproduce"]
