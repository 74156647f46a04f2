"""Mixture-of-Depths baseline (Raposo et al., 2024): a learned router per branch picks the top-k tokens.

API (what the eval sweep and ``gateskip reproduce`` call)::

    add_mod(model, predictor_hidden=64, kv="compute")   # router + causal predictor on every branch
    fit_mod(model, stream, steps=...)                   # training loop on input_ids batches -> log rows
    calibrate_mod(model, batches)                       # predictor-logit quantiles: any ratio at inference
    save_mod(model, dir) / load_mod(model, dir)         # a "MoD folder" (gates.safetensors + gateskip.json)
    train_mod(model="smollm2-135m", out=..., steps=...) # all of the above on offline text (`gateskip train-mod`, commands/train_mod.py)
    set_mode(model, "predictor" | "topk")               # causal predictor (default) or non-causal top-k
    with gateskip.skipping(model, ratio=r): ...; gateskip.stats(model)   # as for GateSkip gates
    gateskip.remove_gates(model)                        # back to the original model, bit-identical

Granularity: one router per *branch* (attention, MLP) rather than per whole decoder layer. That is
the unit GateSkip gates and skips, so both methods decide the same thing (which tokens run which
branch), run through the same ``GatedBranch`` (masked and physical paths, K/V of skipped tokens) and
are counted by the same ``gateskip.stats`` FLOP model. Raposo's whole-block routing is the special
case where a layer's two decisions are tied.

Per branch: router ``r = sigmoid(w . x + b)`` (a scalar gate, ``H -> 1``) on the branch input x. In
training, each sequence's top ``capacity`` fraction of tokens by ``r`` run the branch and the
others skip it (non-causal: the choice needs the whole sequence); the branch output of a kept
token is multiplied by ``r``, which is how the router gets gradients. Capacity follows
``c + (1 - c) / (step / decay + 1)`` (c = 0.8, decay = 1500 as in the paper; shorter runs may
shorten ``decay``). A predictor (``H -> 64 -> ReLU -> 1`` on the detached branch input) is trained
with BCE against the top-k decisions; at inference a token runs a branch when its predictor logit
is above the branch's calibrated ``ratio``-quantile, a decision that depends on that token alone,
so prefill and decode are causal. Router and predictor FLOPs are counted as gate FLOPs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gateskip.checkpoint import GATES_FILE, _load_gate_tensors, _read_tensors, read_meta, save_gates
from gateskip.config import GateSkipConfig
from gateskip.core import (
    add_gates,
    gate_parameters,
    gate_state,
    record_quantiles,
    remove_gates,
    skipping,
)
from gateskip.errors import GateSkipError
from gateskip.policies import quantile_skip, threshold_from_grid
from gateskip.record import peek
from gateskip.state import GateState
from gateskip.taps import gates_bypassed

MODES = ("predictor", "topk")
GRID_POINTS = 1001


class MoDRouter(nn.Module):
    """Router (its output multiplies the branch output) and causal predictor of one branch."""

    def __init__(self, hidden: int, predictor_hidden: int = 64, init_bias: float = 5.0, init_std: float = 0.01):
        super().__init__()
        self.router = nn.Linear(hidden, 1)
        self.predictor = nn.Sequential(nn.Linear(hidden, predictor_hidden), nn.ReLU(), nn.Linear(predictor_hidden, 1))
        with torch.no_grad():  # like GateSkip gates: almost open at the start, so the model starts unchanged
            nn.init.normal_(self.router.weight, 0.0, init_std)
            self.router.bias.fill_(init_bias)
        self.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.router(x.float()))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictor logit per token (> 0: "top-k would keep it"); stop-grad on the input."""
        return self.predictor(x.detach().float()).squeeze(-1)


def router_flops(hidden: int, predictor_hidden: int) -> tuple[int, int]:
    """(router, predictor) FLOPs per token per branch, 2 per multiply-add."""
    return 2 * hidden, 2 * hidden * predictor_hidden + 2 * predictor_hidden


class MoDState(GateState):
    """GateState whose skip decision is MoD routing instead of a gate-importance policy.

    The plan installed by ``gateskip.skipping(ratio=r)`` still says how much each branch skips
    (r = 1 - capacity); ``mode`` says how: per-sequence top-k on the router, or the predictor.
    """

    one_token_fast = False  # the decision is the router's (on_gate), at decode too
    mode: str = "predictor"
    pred_grid: torch.Tensor | None = None  # [branches, GRID_POINTS] predictor-logit quantiles
    bce_log: list | None = None  # training: (predictor logit, kept, valid) per branch call
    costs: tuple[int, int] = (0, 0)

    def on_gate(self, branch, x, g):
        valid = self.valid_for(x)
        log, record = self.taps.log, self.taps.record
        if log is not None:
            log.see(branch, g, valid, None)
        plan = self.plan
        r = plan.ratios[branch.index] if plan is not None else 0.0
        topk = self.mode == "topk" or self.bce_log is not None
        logit = None
        if record is not None or self.bce_log is not None or (r > 0 and not topk):
            logit = branch.gate.predict(x)
        if record is not None:
            record.see(branch, g, valid, logit)  # MoD's predictor is calibrated on its logits
        skip = None
        if plan is not None and r > 0:
            skip = row_topk_skip(g[..., 0].detach(), valid, r) if topk else \
                (logit < self._threshold(branch.index, r)) & valid
        if self.bce_log is not None:
            kept = valid if skip is None else ~skip & valid
            self.bce_log.append((logit, kept, valid))
        if plan is not None:
            self.count_decision(branch, skip, valid)
        return skip

    def _threshold(self, index: int, r: float) -> torch.Tensor:
        if self.pred_grid is None:
            raise GateSkipError("MoD predictor has no calibration: run calibrate_mod(model, batches) or load a "
                                "MoD folder written by train_mod")
        return threshold_from_grid(self.pred_grid[index], r)


def row_topk_skip(score: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per sequence, skip the ``round(ratio * n_valid)`` lowest-scored valid tokens (MoD's top-k)."""
    return torch.cat([quantile_skip(score[i:i + 1], valid[i:i + 1], ratio) for i in range(score.shape[0])])


def capacity_at(step: int, capacity: float = 0.8, decay: float = 1500.0) -> float:
    """Fraction of tokens each branch processes at training ``step``: 1.0 at step 0, -> ``capacity``."""
    return capacity + (1.0 - capacity) / (step / decay + 1.0)


def is_mod(model) -> bool:
    return isinstance(peek(model).state, MoDState)


def add_mod(model: nn.Module, predictor_hidden: int = 64, kv: str = "compute", init_bias: float = 5.0,
            init_std: float = 0.01) -> nn.Module:
    """Attach a MoD router and predictor to every attention and MLP branch (in place); returns ``model``.

    Built on ``add_gates`` with scalar gates whose modules are then replaced by ``MoDRouter``, so
    skipping, K/V handling, stats and ``remove_gates`` are GateSkip's own.
    """
    add_gates(model, GateSkipConfig(gate="scalar", kv=kv, init_bias=init_bias, init_std=init_std), state_cls=MoDState)
    st = gate_state(model)
    hidden = st.branches[0].gate.proj.in_features
    device = next(model.parameters()).device
    for b in st.branches:
        b.gate = MoDRouter(hidden, predictor_hidden, init_bias, init_std).to(device)
    st.costs = router_flops(hidden, predictor_hidden)
    st.pred_grid, st.bce_log = None, None
    set_mode(model, "predictor")
    return model


def set_mode(model: nn.Module, mode: str) -> None:
    """``predictor`` (causal, inference) or ``topk`` (non-causal, as in training); sets the counted cost."""
    if mode not in MODES:
        raise GateSkipError(f"MoD mode={mode!r} is not supported: choose predictor or topk")
    st = _mod_state(model)
    st.mode = mode
    router, predictor = st.costs
    st.flops = dataclasses.replace(st.flops, gate=router + (predictor if mode == "predictor" else 0))


def _mod_state(model) -> MoDState:
    if not is_mod(model):
        raise GateSkipError("this model has no MoD routers: call add_mod(model) or load_mod(model, dir) first")
    return peek(model).state


@torch.no_grad()
def calibrate_mod(model: nn.Module, batches: Iterable, ratio: float = 0.2) -> dict:
    """Predictor-logit quantiles per branch, measured under top-k routing at ``ratio`` (= 1 - c)."""
    st = _mod_state(model)
    mode = st.mode
    try:
        set_mode(model, "topk")
        st.pred_grid, tokens, n = record_quantiles(model, batches, ratio, "quantile", ("attn", "mlp"), GRID_POINTS,
                                                   who="calibrate_mod")
    finally:
        set_mode(model, mode)
    return {"ratio": ratio, "tokens": tokens, "batches": n}


def fit_mod(net: nn.Module, stream, steps: int, lr: float = 1e-3, capacity: float = 0.8, decay: float = 1500.0,
            objective: str = "distill", bce_weight: float = 1.0, warmup: int = 10, start: int = 0, opt=None,
            on_step=None) -> list[dict]:
    """Train routers (top-k, router weight times branch output) and predictors (BCE); backbone frozen.

    ``objective``: ``ce`` (next-token cross-entropy) or ``distill`` (KL to the router-free model,
    as ``gateskip train`` defaults to). ``on_step(step, opt)`` is called after every step
    (checkpointing). Returns one log row per step.
    """
    from gateskip.losses import distillation_kl, next_token_ce
    from gateskip.train import lr_at

    if objective not in ("ce", "distill"):
        raise GateSkipError(f"objective={objective!r} is not supported for MoD: choose ce or distill")
    st = _mod_state(net)
    for p in net.parameters():
        p.requires_grad_(False)
    params = gate_parameters(net)
    for p in params:
        p.requires_grad_(True)
    opt = opt or torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.001)
    device = next(net.parameters()).device
    rows = []
    from tqdm.auto import tqdm

    net.train()
    try:
        for step in tqdm(range(start, steps), initial=start, total=steps, desc="train MoD", dynamic_ncols=True):
            t0 = time.time()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, warmup, lr)
            ids = next(stream).to(device)
            cap = capacity_at(step, capacity, decay)
            teacher = None
            if objective == "distill":
                with torch.no_grad(), gates_bypassed(net):
                    teacher = net(input_ids=ids, use_cache=False).logits
            st.bce_log = []
            try:
                with skipping(net, ratio=1.0 - cap, policy="quantile", path="masked"):
                    logits = net(input_ids=ids, use_cache=False).logits
                log, st.bce_log = st.bce_log, None
            finally:
                st.bce_log = None
            task = next_token_ce(logits, ids) if teacher is None else distillation_kl(logits, teacher)
            bce = torch.stack([F.binary_cross_entropy_with_logits(lg[v], k[v].float()) for lg, k, v in log]).mean()
            loss = task + bce_weight * bce
            if not torch.isfinite(loss):
                raise GateSkipError(f"MoD loss became non-finite at step {step + 1}: lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            agree = torch.stack([((lg > 0) == k)[v].float().mean() for lg, k, v in log]).mean()
            rows.append({"step": step + 1, "capacity": round(cap, 4), "task": round(task.item(), 5),
                         "bce": round(bce.item(), 5), "predictor_agreement": round(float(agree), 4),
                         "sec": round(time.time() - t0, 2)})
            if on_step is not None:
                on_step(step + 1, opt, rows[-1])
    finally:
        net.eval()
    return rows


def save_mod(model: nn.Module, directory, extra_meta: dict | None = None) -> Path:
    """Write routers, predictors and predictor calibration as a MoD folder."""
    st = _mod_state(model)
    extra = {"mod.predictor_grid": st.pred_grid} if st.pred_grid is not None else {}
    hidden = st.branches[0].gate.predictor[0].out_features
    meta = {"method": "mod", "mod": {"predictor_hidden": hidden, **(extra_meta or {})}}
    return save_gates(model, directory, extra_tensors=extra, extra_meta=meta)


def load_mod(model: nn.Module, directory) -> nn.Module:
    """Attach the MoD routers stored in ``directory`` (``train_mod --out``) to ``model``."""
    from gateskip.checkpoint import model_identity

    d = Path(directory)
    meta = read_meta(d)
    if meta.get("method") != "mod":
        raise GateSkipError(f"{str(d)!r} is not a MoD folder (a GateSkip gates folder?): pass the --out of "
                            "`gateskip train-mod`")
    want, have = meta.get("base_model", {}), model_identity(model)
    for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
        if key in want and want[key] != have[key]:
            raise GateSkipError(f"MoD routers in {str(d)!r} belong to another model ({key} {want[key]} vs "
                                f"{have[key]}): load {want.get('source')!r}")
    cfg = meta["config"]
    add_mod(model, predictor_hidden=meta["mod"]["predictor_hidden"], kv=cfg["kv"], init_bias=cfg["init_bias"],
            init_std=cfg["init_std"])
    try:
        tensors = _read_tensors(d / GATES_FILE)
        _load_gate_tensors(model, tensors, d)
        st = _mod_state(model)
        if "mod.predictor_grid" in tensors:
            st.pred_grid = tensors["mod.predictor_grid"]
        st.loaded.meta = meta
    except BaseException:
        remove_gates(model)
        raise
    return model
