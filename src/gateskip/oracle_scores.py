"""Stronger ceilings for token choice: oracles that rank a branch's tokens by what skipping each one changes in the
model's later outputs, measured on the text being scored, instead of by how far the branch output is from its
fallback.

The residual oracle (``policy="oracle"``) skips the tokens whose branch output is nearest its fallback: a distance in
the residual stream, blind to whether the change matters downstream. The gates are fitted and trained toward that
distance and sit at that oracle; these two ask whether choosing by downstream effect has room beyond it. Per branch b
and token t, with ``delta = g * fallback(x) - g * branch(x)`` (what skipping that one token adds to the residual
stream):

- ``marginal_scores`` (exact): the KL from the model's next-token distributions, summed over the ``horizon``
  predictions from t on, when (b, t) alone is skipped: about ``horizon`` tokens of compute per token and branch
  (each token's window packed after the row's prefix; SmolLM2, 2 threads: 12 s per 128-token row at horizon 1,
  57 s at 8, against 6.6 min for a copy of the row per token). The
  horizon is the same for every token it may skip: on teacher-forced text a token near a row's end affects few
  predictions, so summing over the rest of the row would favour skipping the last tokens, an advantage generation,
  where every token is followed by the rest of the answer, does not have. Tokens with fewer than ``horizon``
  predictions after them are never skipped by it (a handicap: on that text they are the cheapest to skip).
- ``fisher_scores`` (second order, cheap): ``E_y[(d/dh_bt sum_s log p_s(y_s)) . delta]^2`` with labels y_s sampled
  from the model's own p_s, an estimate of ``delta' F delta``, twice that KL for small ``delta``. Measured on
  SmolLM2 it ranks worse than the residual distance: skipping a whole branch output is not a small change.

Both cheat (they run the branch, the fallback and the text's later positions) and are teacher-forced only: references,
not methods. Each assumes, as every ranking does, that the effects of skipping many tokens add up. ``given_scores``
installs a batch's scores for ``skipping(policy="oracle_given")``, which ranks each branch's tokens by them per call
like ``quantile``; ``gateskip fit --scored-oracle fisher|marginal [--oracle-horizon N]`` reports them beside the
residual oracle (docs/benchmark-history.md, "Which tokens").
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gateskip.errors import GateSkipError


def _checked(model):
    from gateskip.core import gate_state

    st = gate_state(model)
    if st.plan is not None:
        raise GateSkipError("the oracle's scores are measured with nothing skipped: measure them outside "
                            "gateskip.skipping")
    if any(b.fast_fallback is None for b in st.branches):
        raise GateSkipError("the oracle scores what a skipped token gets from its fallback: these gates have "
                            "none (fallback='zero'); fit one with gateskip fit --fallback lowrank")
    if any(b.placement != "after" for b in st.branches):
        raise GateSkipError("the oracle's scores need gates placed after the branch (placement='after')")
    return st


def _delta(branch, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """What skipping adds to the residual stream where the branch added ``o`` (its gated output) for inputs ``x``."""
    from gateskip.fallback import gated_fallback

    with torch.no_grad():
        return gated_fallback(branch.fast_fallback, x, branch.fast_gate(x).to(x.dtype)) - o


def fisher_scores(model, ids: torch.Tensor, samples: int = 4, seed: int = 0) -> dict[int, torch.Tensor]:
    """{branch index: [B, T] scores} of ``ids`` ([B, T], no padding): the module doc's estimate of each (branch,
    token)'s second-order effect on the output distributions, from ``samples`` sampled label sequences. Runs the
    model once with the gates in place and nothing skipped, then one backward pass per sample."""
    if int(samples) != samples or samples < 1:
        raise GateSkipError(f"samples={samples!r} is invalid: use a whole number >= 1")
    st = _checked(model)
    outs: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def hook(branch):
        def take(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            o = output[0] if isinstance(output, tuple) else output
            deltas[branch.index] = _delta(branch, x, o).float()
            leaf = o.detach().requires_grad_(True)  # the gradient of the outputs with respect to this branch's
            outs[branch.index] = leaf  # contribution to the residual stream, token by token
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf
        return take

    handles = [b.register_forward_hook(hook(b), with_kwargs=True) for b in st.branches]
    try:
        with torch.enable_grad():
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    finally:
        for h in handles:
            h.remove()
    order = [b.index for b in st.branches]
    scores = {i: torch.zeros(deltas[i].shape[:2]) for i in order}
    gen = torch.Generator().manual_seed(seed)
    probs = logp.detach().exp().reshape(-1, logp.shape[-1])
    for s in range(samples):
        y = torch.multinomial(probs, 1, generator=gen).view(logp.shape[:2])
        total = logp.gather(-1, y.unsqueeze(-1)).sum()
        grads = torch.autograd.grad(total, [outs[i] for i in order], retain_graph=s < samples - 1)
        for i, gr in zip(order, grads):
            scores[i] += (gr.float() * deltas[i]).sum(-1).square().cpu() / samples
    return scores


MARGINAL_METHODS = ("packed", "copies")


@torch.no_grad()
def marginal_scores(model, ids: torch.Tensor, horizon: int = 32, chunk: int = 16, progress: bool = True,
                    method: str = "packed", pack_tokens: int = 2048) -> dict[int, torch.Tensor]:
    """{branch index: [B, T] scores} of ``ids`` ([B, T], no padding): per (branch, token), the KL from the model's
    next-token distributions (gates in place, nothing skipped), summed over the ``horizon`` predictions from that
    token on, when that token alone skips that branch; +inf (never skipped) for a token with fewer predictions after
    it.

    ``method="packed"`` (default): per branch, one sequence holds the row's prefix, computed as it is, and for each
    token t a window of the ``horizon`` tokens from t that sees the prefix before t and itself (a custom 4-D
    attention mask, positions given), token t skipping: the same KL as skipping t in a copy of the row (positions
    before t do not see t), for about ``horizon`` tokens of compute per token scored instead of a row.
    ``pack_tokens`` bounds one such sequence. ``method="copies"``: the plain reference, a copy of the row per token,
    ``chunk`` copies at a time."""
    from gateskip.heldout import reference_logprobs

    st = _checked(model)
    if method not in MARGINAL_METHODS:
        raise GateSkipError(f"method={method!r} is invalid: use one of {', '.join(MARGINAL_METHODS)}")
    for name, value in (("chunk", chunk), ("horizon", horizon), ("pack_tokens", pack_tokens)):
        if int(value) != value or value < 1:
            raise GateSkipError(f"{name}={value!r} is invalid: use a whole number >= 1")
    if horizon > ids.shape[1] - 1:
        raise GateSkipError(f"horizon={horizon} is longer than the rows' {ids.shape[1] - 1} predictions: use rows of "
                            f"more than {horizon + 1} tokens or a shorter horizon")
    ref = reference_logprobs(model, [ids])[0]
    b_rows, t_len = ids.shape
    scores = {b.index: torch.full((b_rows, t_len), float("inf")) for b in st.branches}
    last = t_len - 1 - horizon  # the last token with a whole horizon after it; the ones after it stay +inf
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(st.branches) * b_rows, desc="marginal oracle scores", unit="row")
    step = chunk if method == "copies" else max(1, (pack_tokens - t_len) // horizon)
    measure = _skip_one_each if method == "copies" else _skip_one_each_packed
    for branch in st.branches:
        for r in range(b_rows):
            for start in range(0, last + 1, step):
                pos = torch.arange(start, min(start + step, last + 1))
                scores[branch.index][r, pos] = measure(model, branch, ids[r], pos, ref[r], horizon).cpu()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return scores


def _skipping_where(branch, where: torch.Tensor):
    """A forward hook on ``branch``: the tokens where ``where`` ([B, T] bool) is True get what skipping gives them."""
    def swap(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        o = output[0] if isinstance(output, tuple) else output
        o = torch.where(where.unsqueeze(-1).to(o.device), o + _delta(branch, x, o), o)
        return (o, *output[1:]) if isinstance(output, tuple) else o
    return swap


def _skip_one_each(model, branch, row: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, horizon: int
                   ) -> torch.Tensor:
    """[len(pos)]: copies of ``row``, copy j with token ``pos[j]`` skipping ``branch`` alone; each copy's KL from
    ``ref`` ([T-1, V] log-probabilities), summed over the ``horizon`` predictions from ``pos[j]`` on (+inf where
    fewer remain)."""
    n, n_pred = pos.numel(), ref.shape[0]
    # causal: the predictions within the horizon of these tokens need the row only up to the last of them
    keep = min(row.numel(), int(pos.max()) + horizon + 1)
    row, ref = row[:keep], ref[:keep - 1]
    where = torch.zeros(n, row.numel(), dtype=torch.bool, device=row.device)
    where[torch.arange(n), pos.to(row.device)] = True

    handle = branch.register_forward_hook(_skipping_where(branch, where), with_kwargs=True)
    try:
        logits = model(input_ids=row.expand(n, -1), use_cache=False).logits[:, :-1].float()
    finally:
        handle.remove()
    logp = F.log_softmax(logits, dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).clamp(min=0)  # [n, T-1]: prediction s is made at position s
    s = torch.arange(kl.shape[1], device=kl.device)
    p = pos.to(kl.device).unsqueeze(1)
    out = kl.masked_fill((s < p) | (s >= p + horizon), 0.0).sum(-1)
    return out.masked_fill(pos.to(kl.device) + horizon > n_pred, float("inf"))


def _skip_one_each_packed(model, branch, row: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, horizon: int
                          ) -> torch.Tensor:
    """``_skip_one_each`` in one sequence: the row's first ``max(pos)`` tokens (nothing skipped), then for each
    ``pos[j]`` a window of the row's ``horizon`` tokens from it, at their own positions, seeing the prefix before
    ``pos[j]`` and the window up to itself, its first token skipping ``branch``."""
    n_pred, h, n = ref.shape[0], horizon, pos.numel()
    pos = pos.to(row.device)
    lead = int(pos.max())
    at = pos.unsqueeze(1) + torch.arange(h, device=row.device)  # [n, h]: each window's positions
    tokens = torch.cat([row[:lead], row[at.clamp(max=row.numel() - 1)].flatten()])
    positions = torch.cat([torch.arange(lead, device=row.device), at.flatten()])
    length = tokens.numel()
    allowed = torch.zeros(length, length, dtype=torch.bool, device=row.device)
    allowed[:lead, :lead] = torch.ones(lead, lead, dtype=torch.bool, device=row.device).tril()
    own = lead + torch.arange(n * h, device=row.device)  # the windows' places in the sequence
    window = torch.arange(n, device=row.device).repeat_interleave(h)  # which window each of them is in
    # a window token sees the prefix before its window's first position ...
    allowed[own.unsqueeze(1), torch.arange(lead, device=row.device).unsqueeze(0)] = (
        torch.arange(lead, device=row.device).unsqueeze(0) < pos[window].unsqueeze(1))
    # ... and its own window up to itself
    first = lead + window * h
    cols = first.unsqueeze(1) + torch.arange(h, device=row.device)  # [n h, h]
    allowed[own.unsqueeze(1), cols] = cols <= own.unsqueeze(1)
    mask = _packed_masks(model, allowed, positions)
    where = torch.zeros(1, length, dtype=torch.bool, device=row.device)
    where[0, lead + torch.arange(n, device=row.device) * h] = True

    handle = branch.register_forward_hook(_skipping_where(branch, where), with_kwargs=True)
    try:
        logits = model(input_ids=tokens.unsqueeze(0), attention_mask=mask, position_ids=positions.unsqueeze(0),
                       use_cache=False).logits[0, lead:].float().view(n, h, -1)
    finally:
        handle.remove()
    logp = F.log_softmax(logits, dim=-1)  # [n, h, V]: window j's token i predicts after position pos[j] + i
    target = ref[at.clamp(max=n_pred - 1)]  # [n, h, V]
    kl = (target.exp() * (target - logp)).sum(-1).clamp(min=0)
    out = kl.masked_fill(at >= n_pred, 0.0).sum(-1)
    return out.masked_fill(pos + horizon > n_pred, float("inf"))


def _packed_masks(model, allowed: torch.Tensor, positions: torch.Tensor):
    """The additive 4-D mask of a packed sequence (``allowed``: [L, L] query by key), with each sliding-window
    layer's window applied by position: one mask, or one per layer type for models that take them so."""
    from gateskip.arch import text_config

    cfg = text_config(model)
    dtype = model.dtype

    def additive(ok):
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, torch.finfo(dtype).min)[None, None]

    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if not window:
        return additive(allowed)
    near = allowed & (positions.unsqueeze(0) > positions.unsqueeze(1) - window)
    types = getattr(cfg, "layer_types", None)
    if types is None:  # every layer slides (Mistral)
        return additive(near)
    return {"full_attention": additive(allowed), "sliding_attention": additive(near)}


@contextlib.contextmanager
def given_scores(model, scores: dict[int, torch.Tensor]):
    """Inside the block, ``policy="oracle_given"`` ranks each branch's tokens by ``scores`` (``fisher_scores`` or
    ``marginal_scores`` of the batch being run)."""
    from gateskip.core import gate_state

    st = gate_state(model)
    previous, st.given_scores = st.given_scores, scores
    try:
        yield
    finally:
        st.given_scores = previous


