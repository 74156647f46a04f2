"""Gates fitted in closed form to rank tokens by what skipping them costs: a local fit, no backprop.

Skipping token t at a branch changes the residual stream by r_t = y_t - fb(x_t) (y: the branch
output, x: its input, fb: the fallback, 0 for the paper's zero). The tokens worth skipping are those
with the smallest ||r_t||: the residual oracle (``skipping(policy="oracle")``) skips exactly those,
computing the branch to know. A gate cannot compute the branch, but for an MLP ||r_t|| is a function
of x_t alone, so it can be predicted; for attention it also depends on the context.

``fit_gates`` regresses s_t = log ||r_t|| on x_t for every branch (streaming float64 ridge with an
intercept, the same sums as ``fit_fallback``) and writes the prediction into the gate. Every output
unit of the gate gets the logit ``open_logit + spread * z(x)``, z the prediction standardised on the
calibration tokens, so:

- the importance (mean gate value) is increasing in the predicted cost: the quantile and threshold
  policies skip the tokens predicted cheapest (calibrate thresholds after fitting);
- the gate value stays near 1 (sigmoid(open_logit +- 3 spread): 0.9933..0.99998 at the defaults), so a kept
  token's branch output is almost unchanged. Importances near 1 need float32 gates, which gates always
  are; the comparison runs in the backbone's dtype, so a bf16 backbone needs a smaller ``open_logit``.

Returns per-branch R^2 of the log-cost prediction: how learnable each branch's cost is from its input.
End-to-end training can start from these gates.
"""

from __future__ import annotations

import warnings

import torch

from gateskip.errors import GateSkipError


@torch.no_grad()
def fit_gates(model, batches, ridge: float = 1e-2, open_logit: float = 8.0, spread: float = 1.0,
              exclude_first: int | None = None, eps: float = 1e-6, under_plan: dict | None = None,
              branches=None) -> dict:
    """Fit every gate of ``model`` to predict its branch's skipping cost; returns ``{"tokens", "r2"}``.

    Args:
        batches: ``input_ids`` tensors or tokenizer outputs (calibration text, not evaluation text).
        ridge: L2 penalty, relative to the mean input variance (as ``fit_fallback``).
        open_logit / spread: the gate logit is ``open_logit + spread * z``, z the standardised predicted log cost.
        exclude_first: leave the first N tokens of each sequence out (default: the config's protect_first).
        eps: added to ||r|| before the log.
        under_plan: ``skipping()`` arguments: fit branch by branch in execution order, each under that plan
            with the earlier gates already fitted, so each sees the inputs it will see when skipping is on
            (masked path, K/V computed; a pass stops once its branch has been seen). Default: one pass of the
            model with the gates bypassed.
        branches: names of the gates to fit (default: all); the others are left as they are.

    The cost uses each branch's current fallback, so fit the fallback first (``fit_fallback``). The
    inputs are the dense model's with the gates bypassed (one pass): the fitted gates are ~1. Gates of kind ``mlp`` are not supported (their output
    layer follows a ReLU, so the logit cannot be set to a linear function of x).
    """
    from gateskip.arch import text_config
    from gateskip.core import gate_state, skipping
    from gateskip.fallback_fit import _collect
    from gateskip.taps import gates_bypassed

    st = gate_state(model)
    _check_fittable(st, "fit_gates")
    if ridge < 0 or spread <= 0:
        raise GateSkipError(f"fit_gates: ridge={ridge} must be >= 0 and spread={spread} > 0")
    hidden = text_config(model).hidden_size
    inputs = _inputs(model, batches, "fit_gates")

    def add(branch, moments, x, y):
        moments.add(x, _log_cost(branch.fallback, x, y, eps))

    first = st.cfg.protect_first if exclude_first is None else int(exclude_first)
    chosen = st.branches if branches is None else [b for b in st.branches if b.name in set(branches)]
    if branches is not None and len(chosen) != len(set(branches)):
        raise GateSkipError(f"fit_gates: unknown branch name in {sorted(set(branches))}: use names like "
                            f"{st.branches[0].name!r}")
    was_training = model.training
    model.eval()
    r2, tokens = {}, 0
    try:
        if under_plan is None:
            with gates_bypassed(model):  # the fitted gates are ~1: fit on the inputs the branches will then see
                moments = _collect(model, st, inputs, chosen, hidden, True, None, skipping, add=add, first=first)
            tokens = _solve(chosen, moments, ridge, open_logit, spread, r2)
        else:
            plan = {**under_plan, "path": "masked", "kv": "compute"}
            for b in chosen:  # in execution order: each pass sees the earlier gates already fitted
                moments = _collect(model, st, inputs, [b], hidden, True, plan, skipping, add=add, first=first)
                tokens = _solve([b], moments, ridge, open_logit, spread, r2) or tokens
    finally:
        model.train(was_training)
    return {"tokens": tokens, "r2": r2}


def _check_fittable(st, who: str) -> None:
    """The gates can hold a linear cost predictor, one per branch, placed after it (``_write_gate``)."""
    if st.cfg.gate == "mlp":
        raise GateSkipError(f"{who} cannot write a linear cost predictor into gate='mlp' gates: build the gates "
                            "with gate='vector', 'lowrank' or 'scalar'")
    if st.cfg.placement != "after":
        raise GateSkipError(f"{who} needs gates placed after the branch (placement='after')")
    if st.cfg.shared:
        raise GateSkipError(f"{who} fits one gate per branch: build the gates with shared=False")


def _inputs(model, batches, who: str) -> list[dict]:
    from gateskip.core import _as_inputs

    batches = list(batches)
    if not batches:
        raise GateSkipError(f"{who} got no batches: pass an iterable of input_ids tensors or tokenizer outputs")
    device = next(model.parameters()).device
    return [_as_inputs(b, device) for b in batches]


def _log_cost(fb, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """log ||y - fb(x)|| per token ([N, 1]): what skipping each token moves the residual stream by."""
    r = y.float() if fb is None else y.float() - fb(x).float()
    return torch.log(r.norm(dim=-1, keepdim=True) + eps)


# A gate regresses on its branch input: with fewer tokens than a few times its width the fit generalises badly
# (SmolLM2's 576-wide MLP inputs: refitted on 714 tokens, held-out KL 14-20% above the default gates; on 12,288 tokens,
# level with them; benchmark-history.md, "Which tokens" and "A causal ceiling, on more text").
FEW_TOKENS_PER_INPUT = 4


def _solve(chosen, moments, ridge, open_logit, spread, r2) -> int:
    tokens = 0
    for b in chosen:
        m = moments[b.index]
        if m.n == 0:
            raise GateSkipError("fit_gates saw no real tokens: pass batches with tokens past the protected prefix")
        w, bias, r2[b.name] = m.solve(True, None, ridge)
        w = w[:, 0]
        n = m.n
        if not tokens and n < FEW_TOKENS_PER_INPUT * w.numel():
            warnings.warn(f"the gates are fitted on {n:.0f} tokens for {w.numel()}-wide inputs: a closed-form gate fit "
                          f"needs at least {FEW_TOKENS_PER_INPUT} tokens per input to generalise; give more or longer "
                          "calibration rows", stacklevel=2)
        mx = m.sx / n
        cxx = m.xx - n * torch.outer(mx, mx)
        sd = float((w @ cxx @ w / n).clamp_min(0.0)) ** 0.5  # std of the prediction on the calibration tokens
        mean = float(m.sy[0] / n)  # the prediction's mean equals the target's (intercept)
        scale = spread / sd if sd > 0 else 0.0
        _write_gate(b.gate, w * scale, open_logit + scale * (float(bias[0]) - mean))
        tokens = tokens or n
    return tokens


def _write_gate(gate, w: torch.Tensor, b: float) -> None:
    """Set ``gate`` so that every output unit's logit is ``x . w + b``."""
    linears = [m for m in gate.proj.modules() if isinstance(m, torch.nn.Linear)]
    w = w.to(linears[0].weight)
    if len(linears) == 1:  # vector (H -> H) or scalar (H -> 1)
        lin = linears[0]
        lin.weight.copy_(w.expand_as(lin.weight))
        lin.bias.fill_(b)
        return
    down, up = linears  # low rank: H -> R -> H
    down.weight.zero_()
    down.weight[0].copy_(w)
    up.weight.zero_()
    up.weight[:, 0] = 1.0
    up.bias.fill_(b)


@torch.no_grad()
def refit_under_plan(model, batches, under_plan: dict, ridge: float = 1e-3, gate_ridge: float = 1e-2,
                     fit_gates: bool = True, open_logit: float = 8.0, spread: float = 1.0,
                     exclude_first: int | None = None, eps: float = 1e-6, progress: bool = True) -> dict:
    """Refit every branch's fallback, then its gate, in execution order under ``under_plan``: one pass per branch.

    Each pass runs the model under the plan (``skipping()`` arguments; masked path, K/V computed) with the
    branches below already refitted, keeps the branch's inputs and outputs (the pass stops there; it starts at
    the branch's own layer from the hidden states entering it, kept once per layer: linear in depth), fits the
    fallback on them (as ``fit_fallback``) and then the gate on the new fallback's residuals (as ``fit_gates``):
    each branch is fitted on the inputs it sees when skipping is on. ``batches`` are held in memory per branch
    (a few batches are enough: O(tokens x H)). Returns ``{"fallback_r2", "gate_r2", "tokens"}``.
    """
    from gateskip.arch import text_config
    from gateskip.core import gate_state, skipping
    from gateskip.fallback import FALLBACK
    from gateskip.fallback_fit import Moments, _collect, layer_inputs, solve_fallback

    st = gate_state(model)
    cfg = st.cfg
    if not cfg.has_fallback and not fit_gates:
        raise GateSkipError("refit_under_plan has nothing to fit: the gates have fallback='zero' and fit_gates=False")
    if fit_gates and (cfg.gate == "mlp" or cfg.placement != "after" or cfg.shared):
        raise GateSkipError("refit_under_plan fits gates of kind vector, scalar or lowrank placed after the branch, "
                            "one per branch (shared=False)")
    hidden = text_config(model).hidden_size
    device = next(model.parameters()).device
    inputs = _inputs(model, batches, "refit_under_plan")
    plan = {**under_plan, "path": "masked", "kv": "compute"}
    first = cfg.protect_first if exclude_first is None else int(exclude_first)
    fb_r2, gate_r2, tokens = {}, {}, 0
    branches = st.branches
    if progress:
        from tqdm.auto import tqdm

        branches = tqdm(branches, desc="refit under the plan", unit="branch")
    was_training = model.training
    model.eval()
    start = None  # (layer, hidden states entering it): each pass starts at the branch's own layer
    try:
        for b in branches:
            if b.layer > 0 and (start is None or start[0] != b.layer):
                # every branch below is refitted: the states entering this layer are final
                start = (b.layer, layer_inputs(model, inputs, b.layer, plan, skipping, start))
            kept = []
            # x: [x, h] (h the MLP's activation) for a neurons fallback, which picks its neurons from it
            _collect(model, st, inputs, [b], hidden, False, plan, skipping, wide=True,
                     add=lambda _b, _m, x, y, kept=kept: kept.append((x, y)), first=first, start=start)
            if not kept or sum(x.shape[0] for x, _ in kept) == 0:
                raise GateSkipError("refit_under_plan saw no real tokens: pass batches with tokens past the prefix")
            fb = b.fallback
            if fb is not None:
                what = cfg.fallback_of(b.kind)
                m = Moments(kept[0][0].shape[1], FALLBACK[what].fits_weights, device, out=hidden)
                for x, y in kept:
                    m.add(x, y)
                fb_r2[b.name] = solve_fallback(fb, m, b, cfg, ridge)
                tokens = tokens or m.n
            if fit_gates:
                g = Moments(hidden, True, device, out=1)
                for x, y in kept:
                    x = x[:, :hidden]
                    g.add(x, _log_cost(fb, x, y, eps))
                tokens = _solve([b], {b.index: g}, gate_ridge, open_logit, spread, gate_r2) or tokens
    finally:
        model.train(was_training)
    return {"fallback_r2": fb_r2, "gate_r2": gate_r2, "tokens": tokens}


@torch.no_grad()
def fit_gates_to_scores(model, batches, scores: list[dict], ridge: float = 1e-2, open_logit: float = 8.0,
                        spread: float = 1.0, exclude_first: int | None = None, eps: float = 1e-6) -> dict:
    """Fit every gate to rank tokens by given per-token costs instead of the fallback's residual: ``scores[k]`` is
    batch k's ``{branch index: [B, T]}`` (e.g. ``oracle_scores.marginal_scores``, what skipping each token alone
    changes downstream); each gate regresses ``log(score + eps)`` on its branch input (the gated model's, nothing
    skipped), over the tokens with a finite score past the protected prefix, and is written as ``fit_gates``
    writes it. ``batches``: ``input_ids`` [B, T] without padding. Returns ``{"tokens", "r2"}``."""
    from gateskip.arch import text_config
    from gateskip.core import gate_state
    from gateskip.moments import Moments

    st = gate_state(model)
    _check_fittable(st, "fit_gates_to_scores")
    batches = list(batches)
    if len(scores) != len(batches) or not batches:
        raise GateSkipError(f"fit_gates_to_scores got {len(batches)} batches and {len(scores)} score sets: "
                            "give one scores dict per batch")
    first = st.cfg.protect_first if exclude_first is None else int(exclude_first)
    hidden = text_config(model).hidden_size
    moments = {b.index: Moments(hidden, True, next(model.parameters()).device, 1) for b in st.branches}
    seen: dict[int, torch.Tensor] = {}

    def take(branch):
        def hook(_mod, args, kwargs):
            seen[branch.index] = args[0] if args else kwargs["hidden_states"]
        return hook

    was_training = model.training
    model.eval()
    try:
        for ids, sc in zip(batches, scores):
            handles = [b.register_forward_pre_hook(take(b), with_kwargs=True) for b in st.branches]
            try:
                model(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            for b in st.branches:
                cost = sc[b.index].to(seen[b.index].device)
                use = torch.isfinite(cost)
                use[:, :first] = False
                moments[b.index].add(seen[b.index][use], torch.log(cost[use] + eps).unsqueeze(-1))
        r2: dict = {}
        tokens = _solve(st.branches, moments, ridge, open_logit, spread, r2)
    finally:
        model.train(was_training)
    return {"tokens": tokens, "r2": r2}


GATE_TARGETS = ("residual", "marginal")  # what fit_closed_form fits the gates to rank tokens by


def check_gate_target(gate_target: str, sequential) -> None:
    if gate_target not in GATE_TARGETS:
        raise GateSkipError(f"gate_target={gate_target!r} is not supported: choose {' or '.join(GATE_TARGETS)}")
    if gate_target == "marginal" and sequential:
        raise GateSkipError("gate_target='marginal' fits the gates once on the model's own inputs: pass "
                            "sequential=0 (gateskip fit --fit-ratio 0)")


_fit_every_gate = fit_gates  # fit_closed_form's flag of the same name shadows it


def fit_closed_form(model, batches, fallback: str = "lowrank", fallback_rank: int = 64, ridge: float = 1e-3,
                    gate_ridge: float = 1e-2, fit_gates: bool = True, under_plan: dict | None = None,
                    sequential: float | dict = 0.3, sequential_batches: int = 8, log=None,
                    fallback_mlp: str | None = None, fallback_neurons: int | None = None,
                    fallback_rank_mlp: int | None = None, gate_target: str = "residual", horizon: int = 32) -> dict:
    """The closed-form recipe on a gated model (``gateskip fit``'s, and ``gateskip train``'s start): no backprop.

    1. ``fit_fallback`` (kind ``fallback``, the MLP branches' ``fallback_mlp`` if given; or ``"keep"``: the
       model's fallbacks stay as they are) on ``batches``;
    2. ``fit_gates``: every gate ranks tokens by the fallback's residual (``fit_gates=False``: gates unchanged);
    3. with ``sequential`` (a ratio for every branch, or per-branch ratios), ``refit_under_plan`` on the first
       ``sequential_batches`` batches: fallback and gate of each branch refitted in execution order under
       quantile skipping, so each is fitted on the inputs it sees when skipping is on. It replaces 1-2 (a
       branch's inputs depend only on the branches before it, which are refitted first), so 1-2 are not run:
       the fallbacks are only installed (``install_fallbacks``) and every fit is the refit's.

    ``gate_target="marginal"``: step 2 fits the gates to the marginal oracle's scores instead (what skipping each
    token alone changes over the next ``horizon`` predictions, ``oracle_scores.marginal_scores``: about
    ``horizon`` tokens of compute per token and branch), with the fallbacks of step 1; not with ``sequential``.

    ``log``: a function called with one progress line per stage. Returns a summary (R^2 per branch, tokens).
    """
    import time

    from gateskip.core import gate_state
    from gateskip.fallback_fit import fit_fallback, install_fallbacks

    check_gate_target(gate_target, sequential)
    say = log or (lambda _line: None)
    t0 = time.perf_counter()
    st = gate_state(model)
    if fallback == "keep":
        summary = {"fallback": {"kind": st.cfg.fallback, "mlp_kind": st.cfg.fallback_mlp,
                                "rank": st.cfg.fallback_rank, "kept": True}}
        say(f"keeping the model's {st.cfg.fallback_name()} fallbacks")
    elif sequential:  # the refit below fits every fallback: a one-pass fit first would be thrown away
        summary = {"fallback": install_fallbacks(model, fallback, fallback_rank, fallback_mlp, fallback_neurons,
                                                 fallback_rank_mlp)}
    else:
        what = fallback if fallback_mlp in (None, fallback) else f"attn {fallback} / mlp {fallback_mlp}"
        say(f"fitting {what} fallbacks on {len(batches)} batches"
            + (f" under {under_plan['policy']} skipping {under_plan['ratio']:g}" if under_plan else ""))
        fb = fit_fallback(model, batches, kind=fallback, rank=fallback_rank, ridge=ridge, under_plan=under_plan,
                          mlp_kind=fallback_mlp, neurons=fallback_neurons, mlp_rank=fallback_rank_mlp)
        summary = {"fallback": {k: v for k, v in fb.items() if k != "r2"}, "fallback_r2": fb["r2"]}
        say(f"fallback R^2 {by_kind(fb['r2'])}  ({time.perf_counter() - t0:.0f} s)")
    if fit_gates and gate_target == "marginal":
        from gateskip.oracle_scores import marginal_scores

        say(f"marginal oracle scores of {len(batches)} batches (horizon {horizon})")
        gf = fit_gates_to_scores(model, batches, [marginal_scores(model, b, horizon) for b in batches],
                                 ridge=gate_ridge)
        summary["gate_r2"] = gf["r2"]
        say(f"gate log-cost R^2 {by_kind(gf['r2'])}  ({time.perf_counter() - t0:.0f} s)")
    elif fit_gates and not sequential:
        gf = _fit_every_gate(model, batches, ridge=gate_ridge)
        summary["gate_r2"] = gf["r2"]
        say(f"gate log-cost R^2 {by_kind(gf['r2'])}  ({time.perf_counter() - t0:.0f} s)")
    if sequential:
        seq = refit_under_plan(model, batches[:sequential_batches], {"ratio": sequential, "policy": "quantile"},
                               ridge=ridge, gate_ridge=gate_ridge, fit_gates=fit_gates)
        summary["sequential"] = {"ratio": sequential, "batches": min(sequential_batches, len(batches)), **seq}
        if "fallback_r2" not in summary:  # installed above, fitted only here
            summary["fallback_r2"] = seq["fallback_r2"]
            summary["fallback"].update(tokens=seq["tokens"], batches=min(sequential_batches, len(batches)))
        if fit_gates:
            summary["gate_r2"] = seq["gate_r2"]
        what = f"{sequential:g}" if isinstance(sequential, float | int) else "per-branch ratios"
        say(f"refit under skipping {what}: fallback R^2 {by_kind(seq['fallback_r2'])}; "
            f"gate R^2 {by_kind(seq['gate_r2'])}  ({time.perf_counter() - t0:.0f} s)")
    return summary


def by_kind(r2: dict) -> str:
    """``attn mean .. (min .., max ..), mlp mean ..`` of per-branch values named ``layers.<i>.<kind>``."""
    parts = []
    for kind in ("attn", "mlp"):
        v = [x for k, x in r2.items() if k.endswith("." + kind)]
        if v:
            parts.append(f"{kind} mean {sum(v) / len(v):.3f} (min {min(v):.3f}, max {max(v):.3f})")
    return ", ".join(parts)
