"""Workflows behind ``gateskip <command>``: plain functions over the library, one per command.

The CLI (``cli.py``) builds each command's flags from its function's signature and docstring. Here live
the commands that only drive the library: ``train`` (the loop itself is ``gateskip.train.fit``), ``fit``
(closed-form fallbacks and gates), ``bench`` (with ``bench_speculative`` and ``bench_plot``),
``generate``, ``demo``, ``quantize``, and ``lm_eval_cli`` (lm-eval's command line with the gateskip model).
``eval``, ``reproduce``, ``inspect`` and ``train-mod`` are workflows of their own packages (eval/,
reproduce/, analysis/, baselines/mod.py), registered in ``cli.py``. Library modules never import this
package (tests/test_layout.py).
"""
