"""Evaluation on real benchmarks, offline: an lm-eval model with skipping (``lm.py``, needs
lm-evaluation-harness), task configs, the lm-eval sweep (``sweep.py``) and the core suite with paired
comparisons (``suite_run.py``, ``suite_report.py``). The command is ``gateskip eval`` (commands/eval.py).
"""
