"""CALM-style early exit (Schuster et al., 2022) with the model's own LM head: a token stops at the
first checked layer where it is confident enough; the layers above are not run for it.

API (what the eval sweep and ``gateskip reproduce`` call)::

    with EarlyExit(model, threshold, check_layers, measure="softmax") as ee:   # hooks; model without gates
        model(input_ids)                       # any number of calls, with or without KV cache
    ee.stats()                                 # FLOP-weighted compute saved, exits per layer (TokenCounter's keys)
    cal = layer_confidences(model, batches, measure)   # one dense pass on held-out text
    choose_exit(cal, target_saved, measure)    # -> {"threshold", "check_layers", "predicted_saved", ...}
    # the ``early_exit`` rows of ``gateskip eval``: eval/baseline_rows.early_exit_rows

Confidence after layer l (``measure``): ``softmax`` = top-1 minus top-2 probability of
``lm_head(final_norm(h_l))`` (CALM's softmax response); ``saturation`` = cos(h_l, h_{l-1}).
A token whose confidence reaches ``threshold`` at a layer of ``check_layers`` exits there: its
hidden state is copied forward unchanged (the final norm + LM head then give exactly the logits
it was checked with). The layers above still need its K/V for the tokens that continue; like
CALM we *compute* them from the propagated (exited) state. Here that happens by running those
layers on all tokens and putting the exited tokens' states back, which is what a real
implementation computes for the continuing tokens and nothing less for them; the FLOP count
charges an exited token only its K/V projections in the layers above.

Compute per token with exit layer e (``stats``; same FLOP model as ``gateskip.stats``): layers
0..e in full (projections, MLP, attention over its context), K/V projections in layers e+1..L-1,
one confidence check per checked layer it reached (``softmax``: an LM-head projection, 2 H V
FLOPs, ~8 decoder layers of SmolLM2-135M; ``saturation``: 6 H), and the final LM head row unless
the softmax check already produced its logits (reused). Calibration (``choose_exit``) picks, per
target compute saved, the check-layer schedule and threshold with the lowest held-out NLL among
those that reach the target, from confidences of one dense pass (an approximation: exits change
later layers' K/V for the other tokens slightly).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from gateskip.arch import arch_spec, decoder_layers, text_config
from gateskip.core import call_tokens, is_gated
from gateskip.errors import GateSkipError
from gateskip.flopcount import TokenCounter

MEASURES = ("softmax", "saturation")
MAX_CALIB_TOKENS = 1024  # one LM-head pass per layer over these: the calibration's cost


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise GateSkipError(f"exit measure {measure!r} is not supported: choose softmax or saturation")


class _Head:
    """The model's final norm + LM head (+ Gemma's soft cap) applied to intermediate states, uncounted."""

    def __init__(self, model):
        path = arch_spec(model).layers.split(".")
        parent = model
        for part in path[:-1]:
            parent = getattr(parent, part)
        self.norm = parent.norm
        self.head = model.get_output_embeddings()
        self.cap = getattr(text_config(model), "final_logit_softcapping", None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # F.linear, not the module: the LM-head hook that counts output rows must not see checks
        out = F.linear(self.norm(h), self.head.weight, self.head.bias).float()
        return torch.tanh(out / self.cap) * self.cap if self.cap else out


def confidence(head: _Head, h_out: torch.Tensor, h_in: torch.Tensor, measure: str) -> torch.Tensor:
    """Per-token confidence ([N]) from ``h_out`` = h_l and ``h_in`` = h_{l-1} ([N, H])."""
    if measure == "saturation":
        return F.cosine_similarity(h_out.float(), h_in.float(), dim=-1)
    top = head.logits(h_out).softmax(-1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def check_flops(model, measure: str) -> float:
    c = text_config(model)
    return 2.0 * c.hidden_size * c.vocab_size if measure == "softmax" else 6.0 * c.hidden_size


class EarlyExit(TokenCounter):
    """Early exit installed on a model without gates for the duration of a ``with`` block; counts FLOPs.

    Args:
        threshold: a token exits when its confidence is >= this (``inf``: never, the dense model).
        check_layers: 0-based layers after which confidence is checked (the last layer never is).
        measure: ``softmax`` (margin of the LM head's top two) or ``saturation`` (cos(h_l, h_{l-1})).
    """

    def __init__(self, model, threshold: float, check_layers: Iterable[int], measure: str = "softmax"):
        check_measure(measure)
        if is_gated(model):
            raise GateSkipError("early exit runs on the model without gates: call gateskip.remove_gates(model) first")
        super().__init__(model)
        L = self.n_layers
        checks = sorted(set(int(c) for c in check_layers))
        if any(not 0 <= c < L for c in checks):
            raise GateSkipError(f"check_layers {checks} out of range: use layers 0..{L - 2}")
        self.check = frozenset(c for c in checks if c < L - 1)
        self.threshold, self.measure = float(threshold), measure
        self.check_cost = check_flops(model, measure)
        self._head = _Head(model)
        self.full_tokens, self.full_ctx, self.kv_only, self.checks, self.exits = (
            torch.zeros(L, dtype=torch.float64) for _ in range(5))
        self.reused_rows = 0.0
        self._valid = self._ctx = self._exited = None

    def __enter__(self):
        super().__enter__()
        for i, layer in enumerate(decoder_layers(self.model)):
            self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def _on_call(self, model, args, kwargs):
        super()._on_call(model, args, kwargs)
        if kwargs.get("input_ids", args[0] if args else None) is None and kwargs.get("inputs_embeds") is None:
            return
        self._valid, self._ctx = call_tokens(args, kwargs)
        self._exited = torch.zeros_like(self._valid)

    def _on_head(self, m, a, out):
        super()._on_head(m, a, out)
        if self.measure == "softmax" and self._exited is not None and out.dim() == 3:
            rows = out.shape[1]  # the last `rows` positions (generate computes only the last one)
            self.reused_rows += float((self._exited & self._valid)[:, -rows:].sum())

    def _layer_hook(self, i: int):
        window = self.flops.windows[i]

        def hook(_layer, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            valid, exited = self._valid, self._exited
            if valid is None or valid.shape != out.shape[:2]:
                return None
            active = valid & ~exited
            ctx = self._ctx if window is None else self._ctx.clamp(max=window)
            self.full_tokens[i] += float(active.sum())
            self.full_ctx[i] += float(ctx[active].sum())
            self.kv_only[i] += float((valid & exited).sum())
            changed = bool(exited.any())
            if changed:  # exited tokens keep their state: the layer's output for them is discarded
                out = torch.where(exited[..., None], h_in, out)
            if i in self.check and self.threshold != float("inf") and bool(active.any()):
                conf = self._confidence(i, out, h_in, active)
                self.checks[i] += float(active.sum())
                new = torch.zeros_like(active)
                new[active] = conf >= self.threshold
                self.exits[i] += float(new.sum())
                self._exited = exited | new
            if not changed:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    @torch.no_grad()
    def _confidence(self, layer: int, out: torch.Tensor, h_in: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Confidence of the ``active`` tokens ([N]) after ``layer`` (tests override it to force exits)."""
        return confidence(self._head, out[active], h_in[active], self.measure)

    def stats(self, removed_layers=()) -> dict:
        """Compute of the calls in the block (``removed_layers`` is accepted for the sweep and ignored)."""
        f, L = self.flops, self.n_layers
        dense = super().stats()["flops_dense"]
        full = f.attn_qo + f.attn_kv + f.mlp
        executed = float((self.full_tokens * full + self.full_ctx * f.attn_ctx + self.kv_only * f.attn_kv).sum())
        executed += float(self.checks.sum()) * self.check_cost + (self.lm_rows - self.reused_rows) * f.lm_head
        tokens = self.tokens * L
        return {
            "tokens_skipped": float(self.kv_only.sum()) / tokens if tokens else 0.0,
            "compute_saved": 1.0 - executed / dense if dense else 0.0,
            "flops_dense": dense,
            "flops_executed": executed,
            "forward_calls": self.calls,
            "exits_per_layer": [int(x) for x in self.exits],
            "checks": int(self.checks.sum()),
        }


# ---- calibration -------------------------------------------------------------------------------

@torch.no_grad()
def layer_confidences(model, batches: Iterable[torch.Tensor], measure: str = "softmax",
                      max_tokens: int = MAX_CALIB_TOKENS) -> dict:
    """One dense pass: per layer and token, the exit confidence and the NLL of the next token if it
    exited there. ``batches``: packed input_ids (no padding). Returns tensors conf/nll [L, N], ctx [N]."""
    check_measure(measure)
    head, layers = _Head(model), decoder_layers(model)
    confs, nlls, ctxs = [], [], []
    seen = 0
    for ids in batches:
        if seen >= max_tokens:
            break
        rows = max(1, min(ids.shape[0], -(-(max_tokens - seen) // max(1, ids.shape[1] - 1))))
        ids = ids[:rows].to(next(model.parameters()).device)
        states = {}

        def grab(i, states=states):
            def hook(_m, args, kwargs, output):
                h_in = args[0] if args else kwargs["hidden_states"]
                states[i] = (h_in, output[0] if isinstance(output, tuple) else output)
            return hook

        handles = [layer.register_forward_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        target = ids[:, 1:].reshape(-1)
        c, n = [], []
        for i in range(len(layers)):
            h_in, h_out = (s[:, :-1].reshape(-1, s.shape[-1]) for s in states[i])
            logits = head.logits(h_out)
            n.append(F.cross_entropy(logits, target, reduction="none"))
            c.append(confidence(head, h_out, h_in, measure))
        confs.append(torch.stack(c))
        nlls.append(torch.stack(n))
        ctxs.append((torch.arange(ids.shape[1] - 1, dtype=torch.float) + 1).repeat(rows))
        seen += target.numel()
    if not confs:
        raise GateSkipError("early-exit calibration got no batches: pass input_ids tensors")
    return {"conf": torch.cat(confs, 1).cpu().double(), "nll": torch.cat(nlls, 1).cpu().double(),
            "ctx": torch.cat(ctxs).double(), "measure": measure,
            "flops": TokenCounter(model).flops, "check_cost": check_flops(model, measure)}


def schedules(n_layers: int) -> list[list[int]]:
    """Candidate check-layer sets: every single layer, and every m-th layer for m in 1, 2, 3, 4, 6, 8."""
    out = [[layer] for layer in range(n_layers - 1)]
    for m in (1, 2, 3, 4, 6, 8):
        s = list(range(m - 1, n_layers - 1, m))
        if s and s not in out:
            out.append(s)
    return out


def _costs(cal: dict):
    """Per-token FLOP pieces on the calibration text: cumulative full-layer cost [L, N], dense [N]."""
    f, ctx = cal["flops"], cal["ctx"]
    L = cal["conf"].shape[0]
    full = torch.stack([f.attn_qo + f.attn_kv + f.mlp + f.attn_ctx * (ctx if w is None else ctx.clamp(max=w))
                        for w in f.windows[:L]])
    cum = full.cumsum(0)
    kv_after = torch.tensor([(L - 1 - e) * f.attn_kv for e in range(L)], dtype=torch.float64)
    return cum, kv_after, cum[-1] + f.lm_head


def predict(cal: dict, check_layers: list[int], threshold: float, pieces=None) -> tuple[float, float]:
    """(compute saved, mean NLL) on the calibration text for one schedule and threshold."""
    cum, kv_after, dense = pieces or _costs(cal)
    conf, nll, f = cal["conf"], cal["nll"], cal["flops"]
    L, n = conf.shape
    s = torch.tensor(check_layers, dtype=torch.long)
    hit = conf[s] >= threshold
    exited = hit.any(0)
    first = hit.float().argmax(0)  # the first checked layer that fires
    e = torch.where(exited, s[first], torch.full_like(first, L - 1))
    k = torch.where(exited, first + 1, torch.full_like(first, len(check_layers))).double()
    t = torch.arange(n)
    reused = exited if cal["measure"] == "softmax" else torch.zeros_like(exited)  # the check's logits are the output
    head = torch.where(reused, 0.0, float(f.lm_head)).double()
    cost = cum[e, t] + kv_after[e] + k * cal["check_cost"] + head
    return 1.0 - float(cost.sum() / dense.sum()), float(nll[e, t].mean())


def choose_exit(cal: dict, target: float, tol: float = 0.01, iters: int = 40) -> dict:
    """Check layers and threshold that save ``target`` of the FLOPs with the lowest calibration NLL."""
    pieces = _costs(cal)
    lo0, hi0 = float(cal["conf"].min()) - 1e-6, float(cal["conf"].max()) + 1e-6
    best = None
    for sched in schedules(cal["conf"].shape[0]):
        lo, hi = lo0, hi0  # saved(lo) >= saved(hi): a higher threshold exits fewer tokens
        s_lo, s_hi = predict(cal, sched, lo, pieces)[0], predict(cal, sched, hi, pieces)[0]
        if target >= s_lo:
            thr = lo
        elif target <= s_hi:
            thr = hi
        else:
            for _ in range(iters):
                mid = (lo + hi) / 2
                if predict(cal, sched, mid, pieces)[0] >= target:
                    lo = mid
                else:
                    hi = mid
            thr = min((lo, hi), key=lambda x: abs(predict(cal, sched, x, pieces)[0] - target))
        saved, nll = predict(cal, sched, thr, pieces)
        cand = {"threshold": thr, "check_layers": sched, "predicted_saved": saved, "predicted_nll": nll,
                "measure": cal["measure"]}
        key = (abs(saved - target) > tol, abs(saved - target) if abs(saved - target) > tol else 0.0, nll)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]



