"""Closed-form fit of the fallbacks (fallback.py) from calibration text.

Per branch ``fit_fallback`` streams float64 sums of X^T X, X^T Y, sum X, sum Y and the token count
(O(H^2) memory, any number of batches), then ridge-solves the centered least-squares problem with an
intercept. ``lowrank`` is the reduced-rank regression of that solution: W projected onto the top-R
right singular vectors of the fitted values X W, found from (X W)^T (X W) = W^T X^T X W without
materialising X (the sums and their solution: ``moments.Moments``). Optionally under a skipping plan,
branch by branch in execution order.

A ``neurons`` fallback (MLP branches) regresses on [x, h], h the branch's whole activation (what its down
projection receives): the same sums over H + I inputs give, for every neuron, how much of what the linear map
of x leaves unexplained that neuron would explain alone (``neuron_gain``); the K best are kept and the
reduced-rank fit is solved on [x, h_K] (``Moments.select``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gateskip.arch import decoder_layers, keep_layers, text_config
from gateskip.core import _as_inputs, gate_state, skipping
from gateskip.errors import GateSkipError
from gateskip.fallback import FALLBACK, make_fallback, mlp_parts
from gateskip.flops import model_flops
from gateskip.moments import Moments, neuron_gain


def solve_fallback(fb: nn.Module, m: Moments, branch, cfg, ridge: float) -> float:
    """Fit ``branch``'s fallback ``fb`` from the sums ``m`` (over [x, h] for ``neurons``); returns its R^2.

    A ``neurons`` fallback copies its chosen neurons' projections from the branch's MLP."""
    kind, rank = FALLBACK[cfg.fallback_of(branch.kind)], cfg.rank_of(branch.kind)
    if not kind.mlp_only:
        w, bias, r2 = m.solve(kind.fits_weights, rank if kind.uses_rank else None, ridge)
        set_solution(fb, w, bias)
        return r2
    hidden = fb.B.shape[1]
    chosen = neuron_gain(m, hidden, ridge).topk(cfg.fallback_neurons).indices.sort().values
    cols = torch.cat([torch.arange(hidden, device=chosen.device), hidden + chosen])
    (a, b), bias, r2 = m.select(cols).solve(True, rank, ridge)
    gate_proj, up_proj, _, _ = mlp_parts(branch.module)
    pick = chosen.to(gate_proj.weight.device)
    g, u = (_dense(lin)[pick].T for lin in (gate_proj, up_proj))  # weights are [I, H]: the neurons' columns
    set_solution(fb, (g, u, a, b), bias)
    return r2


def _is_wide(st, b) -> bool:
    """Whether branch ``b``'s fallback regresses on [x, h] (a ``neurons`` fallback)."""
    return FALLBACK[st.cfg.fallback_of(b.kind)].mlp_only


def _dense(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain tensor (int4 weights dequantized)."""
    w = linear.weight
    return (w.dequantize() if hasattr(w, "dequantize") else w).detach()


def set_solution(fb: nn.Module, w, bias: torch.Tensor) -> None:
    """Write a ``Moments.solve`` solution (weights: None, W or (A, B); bias) into fallback ``fb``."""
    fb.set(None if w is None else (w.to(fb.bias) if torch.is_tensor(w) else tuple(t.to(fb.bias) for t in w)),
           bias.to(fb.bias))


class _Stop(Exception):
    """Raised inside a forward once the branch being fitted has been seen: the rest need not run."""


@torch.no_grad()
def fit_fallback(model: nn.Module, batches: Iterable, kind: str | None = None, rank: int | None = None,
                 ridge: float = 1e-3, under_plan: Mapping | None = None, exclude_first: int | None = None,
                 branches: Iterable[str] | None = None, mlp_kind: str | None = None,
                 neurons: int | None = None, mlp_rank: int | None = None) -> dict:
    """Fit every branch's fallback in closed form on calibration ``batches``; returns a summary.

    Args:
        batches: ``input_ids`` tensors or tokenizer outputs (padding, from ``attention_mask``, is ignored).
        kind / rank: ``mean``, ``linear`` or ``lowrank`` (rank ``rank``); default: the gate config's.
            Another kind or rank than the config's replaces it (``save_gates`` then records it).
        mlp_kind: the MLP branches' kind when it differs (``GateSkipConfig.fallback_mlp``), e.g.
            ``kind="lowrank", mlp_kind="linear"``; default: ``kind`` when ``kind`` is given, else the config's.
        neurons: how many neurons a ``neurons`` fallback keeps (``GateSkipConfig.fallback_neurons``);
            default: the config's.
        mlp_rank: the MLP branches' rank when it differs from ``rank`` (``GateSkipConfig.fallback_rank_mlp``);
            default: the config's when neither ``rank`` nor ``kind`` is given, else ``rank``.
        ridge: L2 penalty, relative to the mean input variance (trace(X^T X) / H, centered).
        under_plan: ``skipping()`` keyword arguments (e.g. ``{"ratio": 0.3, "policy": "threshold"}``).
            Without it every branch is fitted in one pass of the dense model. With it, branches are
            fitted one at a time in execution order, each under that plan with every earlier branch's
            fallback installed, so each fits the inputs it sees at inference (masked path: the module
            runs on every token; a pass stops once its branch has been seen; K/V computed for every token, so
            an attention branch's target is its own output, not one altered by copied K/V).
        exclude_first: leave the first N tokens of each sequence out of the fit; default: the gate config's
            ``protect_first`` (tokens that never skip need no fallback, and BOS, the attention sink, is an
            outlier that would pull a least-squares fit).
        branches: names (``layers.3.mlp``) of the branches to fit; default: all. The others keep their
            fallback as it is (e.g. branches a plan never skips need none).

    Returns ``{"kind", "rank", "tokens", "batches", "passes", "r2"}``; ``r2``: per branch, the fraction
    of its (centered) output variance the fallback explains on the calibration data.
    """

    st = gate_state(model)
    cfg = _fallback_config(model, st, kind, rank, mlp_kind, neurons, mlp_rank, "fit_fallback")
    hidden = text_config(model).hidden_size
    inputs = _fit_inputs(model, batches, under_plan, ridge)
    before = _snapshot(st)  # put back if the fit fails (a refit changes the parameters in place)
    _install(model, st, cfg)
    was_training = model.training
    model.eval()
    try:
        groups, plan = _fit_groups(st, branches, under_plan)
        r2, tokens, passes = _fit_groups_in_turn(model, st, cfg, inputs, groups, plan, hidden, ridge,
                                                 exclude_first)
    except BaseException:
        _restore(st, before)
        raise
    finally:
        model.train(was_training)
    return {**describe_fallback(cfg), "tokens": tokens, "batches": len(inputs), "passes": passes, "r2": r2}


def _fit_inputs(model: nn.Module, batches: Iterable, under_plan, ridge: float) -> list[dict]:
    """``fit_fallback``'s arguments checked, and its ``batches`` as model inputs on the model's device."""
    if under_plan is not None and not isinstance(under_plan, Mapping):
        raise GateSkipError(f"under_plan must be a dict of skipping() arguments, not {type(under_plan).__name__}")
    if ridge < 0:
        raise GateSkipError(f"ridge={ridge} is invalid: use a value >= 0")
    batches = list(batches)  # the plan fits branch by branch: one pass over the data each
    if not batches:
        raise GateSkipError("fit_fallback got no batches: pass an iterable of input_ids tensors or tokenizer outputs")
    device = next(model.parameters()).device
    return [_as_inputs(batch, device) for batch in batches]


def _snapshot(st) -> tuple:
    """The gate config, FLOP counts and every branch's fallback (module and a copy of its parameters)."""
    fallbacks = [(b.fallback, None if b.fallback is None else
                  {k: v.clone() for k, v in b.fallback.state_dict().items()}) for b in st.branches]
    return st.cfg, st.flops, fallbacks


def _restore(st, before: tuple) -> None:
    """Put back what ``_snapshot`` took."""
    st.cfg, st.flops = before[0], before[1]
    for b, (fb, values) in zip(st.branches, before[2]):
        b.fallback = fb
        if fb is not None:
            fb.load_state_dict(values)


def _fit_groups(st, branches: Iterable[str] | None,
                under_plan: Mapping | None) -> tuple[list[list], dict | None]:
    """The branches to fit, grouped by pass (all in one, or one each under a plan), and the passes' plan."""
    chosen = st.branches
    if branches is not None:
        names = set(branches)
        unknown = names - {b.name for b in st.branches}
        if unknown:
            raise GateSkipError(f"fit_fallback: no gated branch named {sorted(unknown)[0]!r}: use names like "
                                f"{st.branches[0].name!r}")
        chosen = [b for b in st.branches if b.name in names]
    chosen = [b for b in chosen if b.fallback is not None]  # a kind with fallback "zero" has nothing to fit
    if under_plan is None:
        return [chosen], None
    # kv="compute": under "copy" a skipped token's attention runs on the K/V of the layer below, and that
    # altered output is not the branch the fallback stands in for
    return [[b] for b in chosen], {**under_plan, "path": "masked", "kv": "compute"}


def _fit_groups_in_turn(model, st, cfg, inputs: list[dict], groups: list[list], plan: dict | None,
                        hidden: int, ridge: float, exclude_first: int | None) -> tuple[dict, int, int]:
    """Per group, one pass collecting its branches' sums, then their fits: (r2 by branch, tokens, passes)."""
    r2, tokens, passes = {}, 0, 0
    for group in groups:
        full = any(FALLBACK[cfg.fallback_of(b.kind)].fits_weights for b in group)
        moments = _collect(model, st, inputs, group, hidden, full, plan, skipping, wide=True,
                           first=st.cfg.protect_first if exclude_first is None else int(exclude_first))
        passes += 1
        for b in group:
            m = moments[b.index]
            if m.n == 0:
                raise GateSkipError("fit_fallback saw no real tokens (every position is padding): pass batches "
                                    "whose attention_mask keeps some tokens")
            r2[b.name] = solve_fallback(b.fallback, m, b, cfg, ridge)
            tokens = tokens or m.n
    return r2, tokens, passes


def install_fallbacks(model: nn.Module, kind: str | None = None, rank: int | None = None,
                      mlp_kind: str | None = None, neurons: int | None = None, mlp_rank: int | None = None) -> dict:
    """Give every branch an unfitted fallback of this kind (arguments as ``fit_fallback``'s; output 0 until fitted).

    For a caller that fits them another way, e.g. ``gatefit.refit_under_plan`` branch by branch, where a
    one-pass ``fit_fallback`` first would be replaced entirely. Fallbacks already of this shape are kept.
    Returns ``describe_fallback`` of the new config.
    """
    st = gate_state(model)
    cfg = _fallback_config(model, st, kind, rank, mlp_kind, neurons, mlp_rank, "install_fallbacks")
    _install(model, st, cfg)
    return describe_fallback(cfg)


def describe_fallback(cfg) -> dict:
    """``{"kind", "mlp_kind", "rank"[, "mlp_rank"][, "neurons"]}`` of a config: what a fit summary records."""
    return {"kind": cfg.fallback, "mlp_kind": cfg.fallback_mlp,
            "rank": cfg.fallback_rank if cfg.fallback_kinds & {"lowrank", "neurons"} else None,
            **({"mlp_rank": cfg.fallback_rank_mlp} if cfg.fallback_rank_mlp is not None else {}),
            **({"neurons": cfg.fallback_neurons} if "neurons" in cfg.fallback_kinds else {})}


def _fallback_config(model, st, kind, rank, mlp_kind, neurons, mlp_rank, who: str):
    """The gate config with the requested fallback (None: the config's), checked against the model."""
    mlp = mlp_kind if (kind or mlp_kind) else st.cfg.fallback_mlp
    kind = kind or st.cfg.fallback
    cfg = dataclasses.replace(st.cfg, fallback=kind, fallback_mlp=None if mlp in (None, kind) else mlp,
                              fallback_rank=st.cfg.fallback_rank if rank is None else rank,
                              fallback_neurons=st.cfg.fallback_neurons if neurons is None else neurons,
                              fallback_rank_mlp=mlp_rank if (mlp_rank or rank or kind) else st.cfg.fallback_rank_mlp)
    if not cfg.has_fallback:
        raise GateSkipError(f"{who} has nothing to fit for fallback='zero': pass kind='mean', 'linear' or "
                            "'lowrank' (or build the gates with GateSkipConfig(fallback=...))")
    cfg.check_model(text_config(model).hidden_size)
    return cfg


def _install(model, st, cfg) -> None:
    """New (unfitted) fallback modules where ``cfg`` shapes them differently from the model's config."""
    if cfg.fallback_spec() != st.cfg.fallback_spec():
        hidden = text_config(model).hidden_size
        dtype, device = model.get_input_embeddings().weight.dtype, next(model.parameters()).device
        for b in st.branches:
            b.fallback = make_fallback(cfg, hidden, dtype, device, b.kind, b.module)
        st.cfg, st.flops = cfg, model_flops(model, cfg)


def _collect(model, st, inputs: list[dict], branches: list, hidden: int, full: bool, plan: dict | None,
             skipping, add=None, first: int = 0, wide: bool = False, start=None) -> dict[int, Moments]:
    """One pass over ``inputs``: Moments of each branch's module input and (post-normed) output.

    ``add(branch, moments, x, y)``, if given, accumulates instead of ``moments.add(x, y)`` (``x``, ``y``: the
    branch's real tokens, [N, H]); gatefit.py uses it to regress one value per token. ``first``: leave out the
    first N tokens of each sequence (those ``protect_first`` never skips). ``wide``: for branches with a
    ``neurons`` fallback x is [x, h], h the MLP's activation (its down projection's input), [N, H + I].
    ``start``: ``(layer, states)`` to begin each pass at decoder layer ``layer`` from ``states[k]`` (batch k's
    hidden states entering it, from ``layer_inputs``) instead of running the layers below again."""
    widths = {b.index: hidden + (mlp_parts(b.module)[2].in_features if wide and _is_wide(st, b) else 0)
              for b in branches}
    moments = {b.index: Moments(widths[b.index], full, next(model.parameters()).device, hidden if add is None else 1)
               for b in branches}
    seen: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}
    stop = plan is not None  # one branch per pass: stop the forward once it has been seen
    handles = []

    def take_input(b):
        def hook(_mod, args, kwargs):
            seen[b.index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_output(b):
        def hook(_mod, _args, out):
            x = seen.pop(b.index)
            if b.index in acts:
                x = torch.cat([x, acts.pop(b.index).to(x.dtype)], -1)
            y = out[0] if isinstance(out, tuple) else out
            valid = st.valid_for(x)
            if first and st.call.ctx is not None and st.call.ctx.shape == valid.shape:
                valid = valid & (st.call.ctx.to(valid.device) > first)
            if add is None:
                moments[b.index].add(x[valid], y[valid])
            else:
                add(b, moments[b.index], x[valid], y[valid])
            if stop:
                raise _Stop
        return hook

    def take_activation(b):
        def hook(_mod, args):
            acts[b.index] = args[0]
        return hook

    for b in branches:
        handles.append(b.module.register_forward_pre_hook(take_input(b), with_kwargs=True))
        if widths[b.index] > hidden:
            handles.append(mlp_parts(b.module)[2].register_forward_pre_hook(take_activation(b)))
        # y where the gate multiplies: after the post-norm where the family has one (Gemma)
        handles.append((b.module if b.post_norm is None else b.post_norm).register_forward_hook(take_output(b)))
    try:
        _passes(model, inputs, plan, skipping, start)
    finally:
        for h in handles:
            h.remove()
    return moments


def layer_inputs(model, inputs: list[dict], layer: int, plan: dict | None, skipping, start=None) -> list:
    """The hidden states entering decoder ``layer`` for each batch of ``inputs`` under ``plan`` (the forward stops
    there), optionally resuming from ``start`` (``(layer, states)`` of an earlier call): a branch-by-branch fit
    then runs one layer per pass instead of every layer below it."""
    states: list = []

    def hook(_mod, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _passes(model, inputs, plan, skipping, start)
    finally:
        handle.remove()
    if len(states) != len(inputs):
        raise GateSkipError(f"layer_inputs: decoder layer {layer} was not reached in every pass")
    return states


def _passes(model, inputs: list[dict], plan: dict | None, skipping, start) -> None:
    """One forward per batch under ``plan`` (a hook raising ``_Stop`` ends it early), from ``start`` if given:
    the layers below ``start[0]`` are taken out (``arch.keep_layers``) and its input is replaced by the
    stored states, so the pass computes exactly what a whole pass computes from that layer on."""
    current, undo, handle = [0], None, None

    def feed(_mod, args, kwargs):
        x = start[1][current[0]]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    with skipping(model, **plan) if plan is not None else contextlib.nullcontext():
        try:
            if start is not None:
                layers = decoder_layers(model)
                handle = layers[start[0]].register_forward_pre_hook(feed, with_kwargs=True)
                undo = keep_layers(model, list(range(start[0], len(layers))))
            for k, inp in enumerate(inputs):
                current[0] = k
                try:
                    model(**inp, use_cache=False)
                except _Stop:
                    pass
        finally:
            if undo is not None:
                undo()
            if handle is not None:
                handle.remove()

