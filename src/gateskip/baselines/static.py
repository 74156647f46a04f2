"""Static module skipping: whole branches skipped for every token, chosen by their mean gate value.

A token-independent use of the same gates: rank branches by their mean gate value (the mean
importance) on calibration text and skip the lowest ones entirely, as many as it takes to match a
compute budget. It runs through ``gateskip.skipping`` with ratio 1.0 on the chosen branches
(``quantile`` then skips every token), so skipped attention branches leave the K/V of the layer
below in the cache exactly as token-wise skipping does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gateskip.core import gate_state, skipping
from gateskip.taps import recording_importance


@torch.no_grad()
def mean_gate_values(model, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean gate value (importance averaged over tokens) of every gated branch, no skipping."""
    st = gate_state(model)
    device = next(model.parameters()).device
    with recording_importance(model) as record, skipping(model, ratio=0.0):
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    return {b.name: float(torch.cat(record.per_branch[b.index]).double().mean()) for b in st.branches}


def lowest_first(means: dict[str, float]) -> list[str]:
    return sorted(means, key=lambda n: (means[n], n))


def static_plan(names: Iterable[str]) -> dict:
    """``gateskip.skipping`` keyword arguments that skip exactly the branches ``names``."""
    return {"ratio": dict.fromkeys(names, 1.0), "policy": "quantile"}
