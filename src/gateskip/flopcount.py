"""Compute accounting for evaluation runs, on the same FLOP model as ``gateskip.stats``.

- ``merge_stats`` pools ``gateskip.stats`` dicts of several request calls into one (per-branch
  token counts and FLOP totals add up; fractions are recomputed from the sums).
- ``TokenCounter`` measures runs on models *without* gates (the dense reference, ShortGPT-pruned
  models): it records the tokens and attended context of every forward call and the LM-head rows,
  so that dense FLOPs and the FLOPs of removed layers follow from ``gateskip.flops.model_flops``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from gateskip.arch import text_config
from gateskip.config import GateSkipConfig
from gateskip.core import call_tokens
from gateskip.flops import model_flops


def merge_stats(runs: Iterable[dict], uncounted_gates: Collection[str] | str | None = None) -> dict:
    """Pool ``gateskip.stats`` results; ``uncounted_gates``: branch names (or "all") whose gate
    FLOPs a real implementation would not spend (always-skipped branches, open stand-in gates)."""
    per: dict[str, list[float]] = {}
    dense = executed = gate = 0.0
    calls = 0
    for s in runs:
        dense, executed, gate = dense + s["flops_dense"], executed + s["flops_executed"], gate + s["gate_flops"]
        calls += s["forward_calls"]
        for name, m in s["per_module"].items():
            p = per.setdefault(name, [0.0, 0.0])
            p[0] += m["skipped"] * m["tokens"]
            p[1] += m["tokens"]
    total_tokens = sum(t for _, t in per.values())
    gate_per_token = gate / total_tokens if total_tokens else 0.0
    if uncounted_gates == "all":
        uncounted_gates = list(per)
    freed = sum(per[n][1] for n in (uncounted_gates or ()) if n in per) * gate_per_token
    executed -= freed
    frac = {n: (s / t if t else 0.0) for n, (s, t) in per.items()}
    by_kind = {k: [f for n, f in frac.items() if n.endswith("." + k)] for k in ("attn", "mlp")}
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "tokens_skipped": mean(list(frac.values())),
        "compute_saved": 1.0 - executed / dense if dense else 0.0,
        "attn_skipped": mean(by_kind["attn"]),
        "mlp_skipped": mean(by_kind["mlp"]),
        "flops_dense": dense,
        "flops_executed": executed,
        "gate_flops": gate - freed,
        "forward_calls": calls,
        "per_module": {n: {"skipped": frac[n], "tokens": int(per[n][1])} for n in per},
    }


class TokenCounter:
    """Counts tokens, attended context and LM-head rows of the forward calls of a gate-free model.

    Create it on the full model (its FLOP model and per-layer windows are read then) and use it
    as a context manager around a run, also after layers were pruned.
    """

    def __init__(self, model):
        self.model = model
        self.flops = model_flops(model, GateSkipConfig())
        self.n_layers = text_config(model).num_hidden_layers
        self.tokens = 0.0
        self.ctx = {w: 0.0 for w in set(self.flops.windows)}  # summed context per window size
        self.lm_rows = 0
        self.calls = 0
        self._handles = []

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        head = self.model.get_output_embeddings()
        if head is not None:
            self._handles.append(head.register_forward_hook(self._on_head))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_call(self, _model, args, kwargs):
        tokens = call_tokens(args, kwargs)
        if tokens is None:
            return
        valid, ctx = tokens
        valid = valid.cpu()
        ctx = ctx.cpu()
        self.tokens += float(valid.sum())
        for w in self.ctx:
            c = ctx if w is None else ctx.clamp(max=w)
            self.ctx[w] += float(c[valid].sum())
        self.calls += 1

    def _on_head(self, _m, _a, out):
        self.lm_rows += out.shape[:-1].numel()

    def attn_flops(self, i: int) -> float:
        f = self.flops
        return self.tokens * (f.attn_qo + f.attn_kv) + f.attn_ctx * self.ctx[f.windows[i]]

    def mlp_flops(self, i: int) -> float:
        return self.tokens * self.flops.mlp

    def layer_flops(self, i: int) -> float:
        return self.attn_flops(i) + self.mlp_flops(i)

    def stats(self, removed_layers: Collection[int] = ()) -> dict:
        """Compute of the counted calls: dense (all layers) vs with ``removed_layers`` absent."""
        dense = sum(self.layer_flops(i) for i in range(self.n_layers)) + self.lm_rows * self.flops.lm_head
        removed = sum(self.layer_flops(i) for i in removed_layers)
        return {
            "tokens_skipped": len(removed_layers) / self.n_layers,
            "compute_saved": removed / dense if dense else 0.0,
            "flops_dense": dense,
            "flops_executed": dense - removed,
            "forward_calls": self.calls,
        }

    def reset(self) -> None:
        self.tokens, self.lm_rows, self.calls = 0.0, 0, 0
        self.ctx = dict.fromkeys(self.ctx, 0.0)
