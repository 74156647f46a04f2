"""Differences between transformers 5.x releases that gateskip has to bridge.

transformers 5.24 renamed the KV cache argument of every model, decoder layer and attention
forward from ``past_key_values`` to ``cache`` (the old name stays as a deprecated alias until 5.40)
and the output field likewise. Wrappers read the cache under whichever name the caller used and
hand replacements back under that same name: passing both makes transformers drop ours.
"""

from __future__ import annotations

import inspect

NAMES = ("cache", "past_key_values")


def cache_key(kwargs: dict) -> str:
    """The keyword this call passes its KV cache under (``cache`` on transformers >= 5.24)."""
    for name in NAMES:
        if name in kwargs:
            return name
    return "past_key_values"


def get_cache(kwargs: dict):
    """The KV cache of a forward call's keyword arguments, or None."""
    for name in NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def model_cache_arg(model) -> str:
    """The keyword ``model.forward`` takes its KV cache under."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output):
    """The KV cache a model output carries (``cache``, formerly ``past_key_values``)."""
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "keys", lambda: ())() else None
    if cache is None and "past_key_values" in getattr(output, "keys", lambda: ())():
        cache = output["past_key_values"]
    return cache
