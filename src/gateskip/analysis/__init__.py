"""What the gates learned: per-token importances, category statistics, heatmaps and pages.

``importances(model, tok, text)`` returns ``(tensor [tokens, branches], token texts, branch
names)`` for notebooks; ``gateskip inspect`` writes the PNG / HTML / JSON reports.
"""

from gateskip.analysis.categories import CATEGORIES, categorize
from gateskip.analysis.importance import importances
from gateskip.analysis.report import inspect, report_text

__all__ = ["CATEGORIES", "categorize", "importances", "inspect", "report_text"]
