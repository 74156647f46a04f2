"""The model-level tuner: attach gates, remove them exactly, run with a skipping budget, report.

``add_gates`` wraps every attention and MLP branch (peft-style: the original modules are kept
inside the wrappers), registers one pre-hook on the model that records which tokens of each call
are real (not padding), and one hook on the LM head that counts the logits rows computed.

Why one module of ~370 lines: it is the public surface of the kernel (``add_gates``, ``remove_gates``,
``skipping``, ``stats``, ``calibrate`` and their small helpers), each function short, and a reader of
"what does the model-level API do" finds all of it here; the mechanics live below it (planning.py: the
checking of ``skipping``'s arguments and the plan they make; wrap.py, state.py, policies.py, physical.py,
kv.py, flops.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gateskip.accounting import stats  # noqa: F401  (the public API: gateskip.stats)
from gateskip.arch import arch_spec, decoder_layers, text_config
from gateskip.compat import get_cache
from gateskip.config import GateSkipConfig
from gateskip.errors import GateSkipError
from gateskip.execution import resolve_execution
from gateskip.fallback import make_fallback
from gateskip.flops import model_flops
from gateskip.gates import Gate
from gateskip.planning import build_plan
from gateskip.policies import POLICY, check_ratio
from gateskip.recheck import after_call as recheck_after_call
from gateskip.record import model_record, peek
from gateskip.saved import after_call, before_call, install_budget
from gateskip.state import GateState
from gateskip.taps import gates_bypassed, recording_importance
from gateskip.wrap import GatedBranch

CALIBRATION_POINTS = 1001  # importance quantiles kept per branch: any ratio can be served afterwards


def gate_state(model: nn.Module) -> GateState:
    st = peek(model).state
    if st is None:
        raise GateSkipError("this model has no gates: call gateskip.add_gates(model) or load_gates(model, dir) first")
    return st


def is_gated(model: nn.Module) -> bool:
    return peek(model).state is not None


def add_gates(model: nn.Module, cfg: GateSkipConfig | None = None, state_cls: type[GateState] = GateState
              ) -> nn.Module:
    """Attach one gate to every attention and MLP branch (in place); returns ``model``.

    ``state_cls``: the extension point for other skip deciders. The runtime state's ``on_gate(branch, x, g)``
    decides which tokens of a call skip a branch (returns the skip mask, or None) and queues the decision
    (``count_decision``); a subclass of ``GateState`` that overrides it changes *which* tokens skip while skipping,
    K/V, fallbacks, statistics and ``remove_gates`` stay GateSkip's (Mixture-of-Depths routing, baselines/mod.py).
    Under thresholds, a one-token decode call is decided by one_token.py instead; a subclass whose decision is not a
    gate threshold sets ``one_token_fast = False``."""
    if not (isinstance(state_cls, type) and issubclass(state_cls, GateState)):
        raise GateSkipError(f"state_cls={state_cls!r} is not a GateState subclass: subclass gateskip.state.GateState")
    cfg = cfg or GateSkipConfig()
    if is_gated(model):
        raise GateSkipError("this model already has gates: call gateskip.remove_gates(model) first")
    spec = arch_spec(model)
    hidden = text_config(model).hidden_size
    cfg.check_model(hidden)
    flops = model_flops(model, cfg)
    state = state_cls(cfg=cfg, flops=flops)
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    shared = {kind: Gate(hidden, cfg).to(device) for kind in cfg.modules} if cfg.shared else {}
    for i, layer in enumerate(decoder_layers(model)):
        for kind in cfg.modules:
            attr = spec.attn if kind == "attn" else spec.mlp
            post_attr = spec.attn_post_norm if kind == "attn" else spec.mlp_post_norm
            post = getattr(layer, post_attr) if post_attr else None
            gate = shared[kind] if cfg.shared else Gate(hidden, cfg).to(device)
            branch = GatedBranch(getattr(layer, attr), gate, kind=kind, layer=i, index=len(state.branches),
                                 post_norm=post, placement=cfg.placement, detach_input=cfg.detach_input,
                                 window=flops.windows[i] if i < len(flops.windows) else None, state=state,
                                 fallback=make_fallback(cfg, hidden, dtype, device, kind, getattr(layer, attr)))
            branch.post_attr = post_attr
            setattr(layer, attr, branch)
            if post_attr:  # the norm now runs inside the branch, before the gate (see arch.py)
                setattr(layer, post_attr, nn.Identity())
            state.branches.append(branch)
    handles = [model.register_forward_pre_hook(_begin_call, with_kwargs=True),
               model.register_forward_hook(_end_call, with_kwargs=True)]
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_hook(lambda _m, _a, out: _count_lm_rows(state, out)))
    state.handles = handles
    model_record(model).state = state
    return model


def remove_gates(model: nn.Module) -> nn.Module:
    """Put the original modules back (bit-identical outputs); returns ``model``."""
    st = gate_state(model)
    spec = arch_spec(model)
    layers = decoder_layers(model)
    if st.loaded.backup:
        from gateskip.quantize import restore_weight

        for name, original in st.loaded.backup.items():  # undo backbone changes made by load_gates (quantized too)
            restore_weight(model, name, original)
    for b in st.branches:
        layer = layers[b.layer]
        setattr(layer, spec.attn if b.kind == "attn" else spec.mlp, b.module)
        if b.post_attr:
            setattr(layer, b.post_attr, b.post_norm)
    for h in st.handles:
        h.remove()
    model_record(model).state = None
    return model


def gate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Gate modules by stable name (``layers.{i}.{kind}`` or ``shared.{kind}``)."""
    st = gate_state(model)
    if st.cfg.shared:
        return {f"shared.{b.kind}": b.gate for b in st.branches if b.layer == 0}
    return {b.name: b.gate for b in st.branches}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for g in gate_modules(model).values() for p in g.parameters()]


@contextlib.contextmanager
def skipping(model: nn.Module, ratio: float | Mapping[str, float] = 0.0, policy: str | None = None,
             modules: Iterable[str] = ("attn", "mlp"), kv: str | None = None, seed: int = 0, path: str = "auto",
             allocation: str = "uniform", protect_first: int | None = None, straight_through: bool = False,
             sync_free: bool | None = None, protect_last: bool | None = None,
             protect_tokens: Iterable[int] | None = None, recheck_tokens: Iterable[int] | None = None,
             recheck_below: float = 0.0, saved: float | None = None, protect_prompt: bool = False,
             prompt_boost: float | None = None, protect_tail: int = 0, execution="cached"):
    """Run ``model`` with a per-layer skip budget inside the ``with`` block.

    Args:
        ratio: fraction of tokens each branch skips; a float for all branches, or a mapping from
            ``"attn"`` / ``"mlp"`` / a branch name (``"layers.3.mlp"``) to a ratio (most specific wins).
        policy: ``threshold`` (per token, needs ``calibrate``), ``quantile`` (paper, per call), ``random``,
            ``oracle``: a
            ceiling for measuring gates, not a method (it computes every branch, then skips, per batch
            like quantile, the tokens whose output differs least from their fallback; kv="compute");
            ``oracle_threshold``: the same scores compared per token with thresholds fitted by
            ``calibrate(score="oracle")``, as ``threshold`` compares the gates' importance; ``oracle_given``: ranked
            per call by scores measured on the batch beforehand (``oracle_scores.given_scores``). Default
            (``policies.resolve_policy``): ``threshold`` when the gates are calibrated (a loaded gates folder),
            else ``quantile``.
        modules: branch kinds that skip; the others are gated but never skipped.
        kv: ``copy`` / ``compute`` for skipped attention tokens; default: the gate config's.
        seed: seed of the ``random`` policy.
        path: ``auto`` (physical unless gradients are needed, masked where measured faster: see
            ``physical.faster``), ``physical`` (skipped tokens are never computed), or ``masked`` (every
            token computed, skipped outputs zeroed: training, checks).
        execution: how ``path="auto"`` chooses between gathering a call's kept tokens and computing all of them
            (execution.py): ``cached`` (a table measured on this model and machine if one is cached, else physical.py's
            rule, measured on SmolLM2-135M on a 2-core CPU), ``measured`` (timed once, about a minute, then cached),
            ``rule``, or an ``ExecutionCosts``. Outputs are the same either way.
        allocation: ``uniform`` (paper: every branch skips ``ratio``) or ``global`` (one calibrated
            importance threshold for all branches, FLOP-weighted total ``ratio``; see budget.py).
        protect_first: never skip the first N tokens of each sequence (BOS, the attention sink);
            default: the gate config's (0 unless the gates were trained with it).
        protect_last: never skip the last position of a prompt (a call with nothing cached): the one whose logits
            give the first generated token. Default: the gate config's.
        protect_prompt: never skip a prompt (a call with nothing cached) at all: only generated tokens skip.
        protect_tail: never skip the last N positions of a prompt (in a long passage-then-question prompt: the
            question and the template's end).
        protect_tokens: token ids never skipped (e.g. ``gateskip.special_token_ids(tok)``); default: the gate config's.
        recheck_tokens: generation: a forward call whose top next token is one of these ids (e.g. the stop tokens,
            ``gateskip.stop_ids(tok)``) is computed again for that row without skipping (recheck.py); its compute is
            counted. An answer then ends only where the model without skipping ends it on the same prefix.
        recheck_below: the same for rows whose top next-token probability is below this value (0: off).
        saved: a budget in FLOP-weighted compute saved instead of ``ratio``: after every forward call the ratio of
            every branch of ``modules`` is steered so that the compute saved on the text run so far lands at this
            fraction (gates, fallbacks and rechecks counted; saved.py). Any per-token policy; not with a ratio.
        prompt_boost: with ``saved``, for generation: prompts (calls with nothing cached) are ranked within their call,
            like ``quantile`` ranks a call, and aim at this times the budget; the generated tokens make up the rest
            (skipping a prompt's tokens costs an answer less than skipping its own). None: every call alike.
        straight_through: training only (masked path, gates after the branch): a skipped token's output
            is still 0, but its gate receives the gradient it would get if the token were kept.
        sync_free: never read a branch's skip decision back from the device (a GPU sync per branch).
            Under the quantile policy the count is fixed, so the physical path sizes its gathers from it
            and still skips. Thresholds and random skipping have data-dependent counts, and a decode step
            at batch 1 must know on the host whether to call a branch at all: under ``sync_free`` those
            branches run the masked path instead (no read, no saving). Default: on unless the model is on
            the CPU, where reads are free; pass False on a GPU to skip physically under thresholds at the
            cost of one read per branch (counted in ``stats()["sync_calls"]``). See physical.py.
    """
    st = gate_state(model)
    previous = st.plan
    st.plan, modules = build_plan(model, st, ratio, policy, modules, kv, seed, path, allocation, protect_first,
                                  straight_through, sync_free, protect_last, protect_tokens, recheck_tokens,
                                  recheck_below, saved, protect_prompt, protect_tail,
                                  resolve_execution(model, execution, path))
    if saved is not None:
        st.plan = install_budget(st, st.plan, saved, prompt_boost, modules)
    st.reset_stats()
    st.call.one_token = False  # set per forward call (begin_call) for the plan in force
    try:
        yield st.plan
    finally:
        st.plan, st.call.one_token = previous, False


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, ratio: float | Mapping[str, float] = 0.3, policy: str = "quantile",
              modules: Iterable[str] = ("attn", "mlp"), max_tokens_per_branch: int = 2_000_000,
              score: str = "gate") -> dict:
    """Fit per-branch importance quantiles so that ``policy="threshold"`` skips ``ratio`` on average.

    ``score="oracle"`` fits the oracle's instead (the branch output's distance from what a skipped token
    gets; the sample runs under ``policy="oracle"``), for ``policy="oracle_threshold"``: a reference that
    decides per token like the gates under thresholds. It is kept apart from the gates' calibration and
    not saved with them.

    The sample runs under ``policy`` (quantile by default) at ``ratio`` (a float, or per-branch ratios as
    ``skipping`` takes them, e.g. an allocation from ``gateskip.allocate``), so that each branch sees
    the hidden states it will see when skipping upstream is active. We keep 1001 importance
    quantiles per branch: any ratio can be served later (best near the calibration ratio).
    ``batches``: ``input_ids`` tensors or tokenizer outputs (dicts with ``input_ids`` and
    optionally ``attention_mask``). Returns a summary dict.
    """
    st = gate_state(model)
    if isinstance(ratio, Mapping):  # per-branch budgets (e.g. from gateskip.allocate): calibrate under them
        ratio = {str(k): check_ratio(v, f"skip ratio for {k}") for k, v in ratio.items()}
    else:
        ratio = check_ratio(ratio)
    if score not in ("gate", "oracle"):
        raise GateSkipError(f"score={score!r} is not supported: choose gate or oracle")
    grid, tokens, n_batches = record_quantiles(model, batches, ratio, "oracle" if score == "oracle" else policy,
                                               modules, CALIBRATION_POINTS, max_tokens_per_branch, who="calibrate")
    cal = {"grid": grid, "ratio": ratio, "tokens": tokens}
    if score == "oracle":
        st.loaded.oracle_calibration = cal
    else:
        st.loaded.calibration = cal
    return {"ratio": ratio, "tokens": tokens, "batches": n_batches}


@torch.no_grad()
def record_quantiles(model: nn.Module, batches: Iterable, ratio: float, policy: str, modules: Iterable[str],
                     points: int, max_tokens_per_branch: int = 2_000_000, who: str = "calibrate"):
    """Run ``batches`` under ``skipping(ratio, policy)`` with the branches recording what they rank by
    (``taps.recording_importance``); returns (quantile grid [branches, points], tokens per branch, batches).

    Shared by gate calibration and MoD's predictor calibration: each branch sees the hidden states
    it will see when skipping upstream is active.
    """
    device = next(model.parameters()).device
    n_batches = 0
    with recording_importance(model) as record:
        with skipping(model, ratio=ratio, policy=policy, modules=modules,
                      kv="compute" if POLICY[policy].computes_branch else None):  # the oracles keep skipped tokens' K/V
            for batch in batches:
                model(**_as_inputs(batch, device), use_cache=False)
                n_batches += 1
        if n_batches == 0:
            raise GateSkipError(f"{who} got no batches: pass an iterable of input_ids tensors or tokenizer outputs")
        qs = torch.linspace(0, 1, points, dtype=torch.float64)
        grids = []
        for rec in record.per_branch:
            imp = torch.cat(rec).double()
            if imp.numel() > max_tokens_per_branch:
                imp = imp[torch.randperm(imp.numel(), generator=torch.Generator().manual_seed(0))[:max_tokens_per_branch]]
            grids.append(torch.quantile(imp, qs).float())
        tokens = record.tokens()
    return torch.stack(grids), tokens, n_batches


def _as_inputs(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        ids = batch if batch.dim() == 2 else batch.unsqueeze(0)
        inputs = {"input_ids": ids}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch and batch[k] is not None}
        inputs = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in inputs.items()}
    else:
        raise GateSkipError(f"cannot use a batch of type {type(batch).__name__}: pass input_ids tensors or "
                            "tokenizer outputs (dicts with input_ids)")
    if inputs["input_ids"].numel() == 0:
        raise GateSkipError("empty input: a batch has no tokens")
    return {k: v.to(device) for k, v in inputs.items()}


# ---- hooks ---------------------------------------------------------------------------------------

def call_tokens(args, kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(valid [B, T] bool, context length each token sees [B, T]) of a model forward call, or None.

    Shared by the gate statistics and eval's token counter: padding (from a 2-D attention mask) is
    not a token, and without a mask every token is real and sees the cache plus its own prefix.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return None
    b, t = ref.shape[:2]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
        m = mask.bool().to(ref.device)
        return m[:, -t:], m.long().cumsum(-1)[:, -t:].float()
    past = get_cache(kwargs)
    p = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
    ctx = (torch.arange(t, device=ref.device, dtype=torch.float) + 1 + p).expand(b, t)
    return torch.ones(b, t, dtype=torch.bool, device=ref.device), ctx


def _begin_call(model, args, kwargs):
    """Model-level pre-hook: which tokens of this call are real, how much context each sees, their ids and whether
    anything is cached before them (the never-skip rules read the last two)."""
    tokens = call_tokens(args, kwargs)
    if tokens is not None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = get_cache(kwargs)
        cached = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        st = peek(model).state
        if st.plan is not None and st.plan.budget is not None and not st.rechecking:
            before_call(st, not cached, *tokens)
        st.begin_call(*tokens, ids=ids, prefill=not cached)


def _end_call(model, args, kwargs, output):
    """Model-level forward hook: the dense recheck of this call's triggered rows (recheck.py), then, under a
    compute-saved budget, the next call's ratio (saved.py)."""
    out = recheck_after_call(model, args, kwargs, output)
    st = peek(model).state
    if st is not None and st.plan is not None and st.plan.budget is not None and not st.rechecking:
        after_call(st)
    return out


def _count_lm_rows(st: GateState, output: torch.Tensor) -> None:
    if st.stats is not None and st.plan is not None:  # not ``counts``: that would flush the queue every call
        st.stats.lm_rows += output.shape[:-1].numel()


@contextlib.contextmanager
def original_backbone(model: nn.Module):
    """Run with the backbone weights the gates folder changed (LoRA / full deltas) put back to the original's, gates
    bypassed: the base model, the reference a fine-tuned folder is measured against. A no-op swap for frozen gates."""
    from gateskip.quantize import is_quantized_linear, restore_weight

    st = gate_state(model)
    changed = {}
    for name, original in st.loaded.backup.items():
        owner, attr = name.rpartition(".")[0], name.rpartition(".")[2]
        module = model.get_submodule(owner)
        current = getattr(module, attr)  # a quantized weight is swapped back as is, a float one copied back
        changed[name] = current if is_quantized_linear(module) and attr == "weight" else current.detach().clone()
        restore_weight(model, name, original)
    try:
        with gates_bypassed(model):
            yield
    finally:
        for name, current in changed.items():
            restore_weight(model, name, current)
