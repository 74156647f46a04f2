"""What the gates learned: per-token importances, category statistics, heatmaps and pages.

``importances(model, tok, text)`` returns ``(tensor [tokens, branches], token texts, branch
names)`` for notebooks; ``gateskip inspect`` (commands/inspect.py) writes the PNG / HTML / JSON reports.
"""

from gateskip.analysis.categories import CATEGORIES, categorize
from gateskip.analysis.importance import importances
from gateskip.analysis.report import report_text

__all__ = ["CATEGORIES", "categorize", "importances", "report_text"]
