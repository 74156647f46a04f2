"""gateskip: learned residual gates that let decoder-only LMs skip compute token by token.

Public API (see README.md):

    model, tok = gateskip.load_model("smollm2-135m")
    gateskip.add_gates(model, gateskip.GateSkipConfig())
    with gateskip.skipping(model, ratio=0.3, policy="threshold"):
        model.generate(...)
    gateskip.stats(model)
"""

from gateskip.analysis import importances
from gateskip.chat import stop_ids
from gateskip.checkpoint import load_gates, save_gates
from gateskip.config import RECOMMENDED, GateSkipConfig, special_token_ids
from gateskip.core import add_gates, calibrate, gate_parameters, is_gated, remove_gates, skipping, stats
from gateskip.errors import GateSkipError
from gateskip.execution import execution_costs
from gateskip.fallback_fit import fit_fallback
from gateskip.generation import generate
from gateskip.speculative import speculative_generate
from gateskip.version import __version__


def load_model(*args, **kwargs):
    """Load a causal LM and its tokenizer (see ``gateskip.models.load_model``)."""
    from gateskip.models import load_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "GateSkipConfig", "GateSkipError", "RECOMMENDED", "__version__", "add_gates", "calibrate", "execution_costs", "fit_fallback",
    "gate_parameters", "generate",
    "importances", "is_gated", "load_gates", "load_model", "remove_gates", "save_gates", "skipping",
    "special_token_ids", "speculative_generate", "stats", "stop_ids",
]
