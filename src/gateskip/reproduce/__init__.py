"""The paper's ablation grid and baselines as data (``grid``), their accuracy-vs-compute curves (``curve``) and
the report (``report``). The workflow that trains and evaluates every cell is ``gateskip reproduce``
(commands/reproduce.py)."""
