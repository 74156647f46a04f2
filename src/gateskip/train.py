"""The gate training loop as a library function (``fit``); ``gateskip train`` (commands/train.py) drives it.

Each step: forward with skipping already active (quantile policy, masked path, budget ramping
linearly from 0 to ``max_ratio`` over ``ramp_steps``), loss = objective + lam * sparsity(gates).
Objective ``ce`` is next-token cross-entropy (paper); ``distill`` is KL to the gate-free model's
own logits on the same text (no labels needed, and it asks exactly "behave like the dense model
while skipping"); ``ce+distill`` sums both.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gateskip import distributed as gdist
from gateskip.args import TrainArgs
from gateskip.core import (
    gate_parameters,
    gate_state,
    is_gated,
    skipping,
)
from gateskip.errors import GateSkipError
from gateskip.fallback import fallback_parameters
from gateskip.files import atomic_write
from gateskip.lora import LoraDisabled, attach_lora
from gateskip.losses import answer_positions, distillation_kl, next_token_ce, sparsity
from gateskip.taps import gates_bypassed, logging_gates
from gateskip.train_state import load_checkpoint, save_checkpoint

BACKBONES = ("frozen", "lora", "full")
OBJECTIVES = ("ce", "distill", "ce+distill")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ramp_ratio(step: int, ramp_steps: int, max_ratio: float, min_ratio: float | None = None,
               seed: int = 0) -> float:
    """Skip ratio during training: rises linearly from 0 to ``max_ratio`` over ``ramp_steps``.

    With ``min_ratio`` (a budget ladder) each step draws its target uniformly from
    [min_ratio, max_ratio] instead, from a generator keyed by (seed, step), so a resumed run draws
    the same ratios; the ramp scales the draw.
    """
    target = max_ratio
    if min_ratio is not None:
        u = random.Random(seed * 1_000_003 + step).random()
        target = min_ratio + u * (max_ratio - min_ratio)
    return target * min(1.0, step / max(1, ramp_steps))


def fit(net, stream, args: TrainArgs | None = None, *, out: Path | None = None,
        modules: tuple[str, ...] | None = None, fitted: bool = False, dist: gdist.Dist | None = None,
        fsdp: bool = False, answer_markers: tuple[list[int], list[int]] | None = None, **overrides):
    """The training loop on a gated model and an iterator of ``input_ids`` batches.

    ``args`` (``gateskip.args.TrainArgs``, whose defaults are ``gateskip train``'s) with ``overrides``
    (its fields, e.g. ``steps=200``) replaced. ``modules``: the branch kinds that skip (default: every gated
    kind). ``fitted``: the gates start fitted (closed form or a folder), so an unset ``ramp_steps`` is the short
    ramp (``TrainArgs.ramp``). ``answer_markers``: (header, end ids) of the tokenizer's chat template
    (``chat.answer_markers``), needed by ``loss_on="answers"``.

    Returns the model with LoRA layers still attached (or None): ``train`` merges them. Writes
    ``train_log.jsonl`` and resumable checkpoints under ``out`` when given. With ``dist`` (several
    torchrun processes) each batch from ``stream`` is the global batch: every rank trains on its
    slice, gradients are averaged by DDP, logs are averaged over ranks, and only rank 0 writes.
    ``fsdp`` shards the model with FSDP2 instead of replicating it (see docs/distributed.md).
    """
    a = dataclasses.replace(args or TrainArgs(), **overrides) if overrides else args or TrainArgs()
    d = dist or gdist.SINGLE
    if not is_gated(net):
        raise GateSkipError("fit() needs a gated model: call gateskip.add_gates(model) first")
    if fsdp:
        _check_fsdp(net, d, a.backbone, a.objective)
    if a.loss_on == "answers" and answer_markers is None:
        raise GateSkipError("loss_on='answers' needs the chat template's answer markers: pass "
                            "answer_markers=gateskip.chat.answer_markers(tokenizer)")
    scored = (lambda ids: answer_positions(ids, *answer_markers)) if a.loss_on == "answers" else None
    skip_modules = tuple(modules) if modules is not None else tuple(gate_state(net).cfg.modules)
    teacher = copy.deepcopy(net) if "distill" in a.objective and a.backbone == "full" else None  # the backbone moves
    peft_model, opt = _trainable(net, a, fsdp)
    ckpt = Path(out) / "checkpoint" if out is not None else None
    start = load_checkpoint(ckpt, net, opt, stream, warn=_warn if d.is_main else None, fsdp=fsdp) \
        if a.resume and ckpt is not None else 0
    last_good = start
    log_path = None
    if out is not None and d.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_path = Path(out) / "train_log.jsonl"
        _truncate_log(log_path, start)  # rows past the checkpoint are re-done: do not log them twice
    # DDP all-reduces (averages) the trainable gradients during backward; rank 0's weights are
    # broadcast at construction, so ranks start identical even if their seeds differed.
    # Under FSDP the model itself is sharded and reduces gradients (reduce-scatter) on its own.
    model = torch.nn.parallel.DistributedDataParallel(net) if d.enabled and not fsdp else net
    net.train()
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="train gates", dynamic_ncols=True,
               disable=not d.is_main)
    ramp_steps, budget = a.ramp(fitted), a.budget_ratios()
    for step in bar:
        ratio = ramp_ratio(step, ramp_steps, 1.0 if budget else a.max_ratio, a.min_ratio, a.seed)
        plan_ratio = {k: v * ratio for k, v in budget.items()} if budget else ratio
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.warmup, group["base_lr"])
        t0 = time.time()
        totals = {"loss": 0.0, "task": 0.0, "sparsity": 0.0, "gate_mean": 0.0, "skipped": 0.0}
        for micro in range(a.grad_accum):
            ids = gdist.shard(next(stream), d).to(next(net.parameters()).device)
            for k, v in _micro_step(net, model, teacher, peft_model, ids, scored, a, plan_ratio, skip_modules, step,
                                    ckpt, last_good, sync=d.enabled and not fsdp and micro < a.grad_accum - 1,
                                    d=d).items():
                totals[k] += v
        norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        if not torch.isfinite(norm):  # gradients are all-reduced, so every rank sees the same norm
            raise GateSkipError(f"gradients became non-finite at step {step + 1}: training stopped; lower --lr or "
                                f"--lam. {_last_good(ckpt, last_good)}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        totals = gdist.mean_over_ranks(totals, d)
        row = {"step": step + 1, "ratio": round(ratio, 4), **{k: round(v, 5) for k, v in totals.items()},
               "lr": opt.param_groups[0]["lr"], "sec": round(time.time() - t0, 2)}
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}", sp=f"{row['sparsity']:.3f}", gate=f"{row['gate_mean']:.3f}",
                        skip=f"{row['skipped']:.2f}")
        if ckpt is not None and ((step + 1) % a.save_every == 0 or step + 1 == a.steps):
            _checkpoint(net, opt, stream, ckpt, step, a, ramp_steps, last_good, d, fsdp)
            last_good = step + 1
    net.eval()
    return peft_model


def _trainable(net, a: TrainArgs, fsdp: bool) -> tuple:
    """(the LoRA model or None, the optimizer): what trains (gates, fallbacks when ``a.train_fallback`` and the
    model has any, LoRA or the whole backbone), each group at its learning rate."""
    for p in net.parameters():
        p.requires_grad_(False)
    peft_model = None
    if a.backbone == "lora":
        peft_model = attach_lora(net, a.lora_rank)
    elif a.backbone == "full":
        for p in net.parameters():
            p.requires_grad_(True)
    for p in gate_parameters(net):
        p.requires_grad_(True)
    fallbacks = fallback_parameters(net) if a.train_fallback else []  # none with zero fallbacks
    for p in fallbacks:
        p.requires_grad_(True)
    if fsdp:  # shard before the optimizer is built, so that it holds (and shards) the DTensor parameters
        gdist.shard_model(net)
    gates = gate_parameters(net)
    fb_ids = {id(p) for p in fallbacks}
    gate_ids = {id(p) for p in gates} | fb_ids
    other = [p for p in net.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": gates, "lr": a.lr, "base_lr": a.lr}]
    if fallbacks:
        groups.append({"params": [p for p in net.parameters() if id(p) in fb_ids], "lr": a.fallback_lr,
                       "base_lr": a.fallback_lr})
    if other:
        groups.append({"params": other, "lr": a.backbone_lr, "base_lr": a.backbone_lr})
    return peft_model, torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.001)


def _micro_step(net, model, teacher, peft_model, ids, scored, a: TrainArgs, plan_ratio, skip_modules, step: int,
                ckpt, last_good: int, sync: bool, d) -> dict[str, float]:
    """One micro-batch: the teacher's logits (distillation), the forward pass under skipping, the loss
    (objective + lam * sparsity) backward; returns its share of the step's logged values. ``scored``: ids -> the
    [B, T] positions the objective scores (None: all)."""
    teacher_logits = None
    if "distill" in a.objective:
        with torch.no_grad():
            if teacher is not None:
                with gates_bypassed(teacher):
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            else:
                with gates_bypassed(net), LoraDisabled(peft_model):
                    teacher_logits = net(input_ids=ids, use_cache=False).logits
    st = gate_state(net)
    with logging_gates(net) as log, skipping(net, ratio=plan_ratio, policy="quantile", modules=skip_modules,
                                             straight_through=a.straight_through):
        logits = model(input_ids=ids, use_cache=False).logits
        skipped = _skipped_fraction(st)
    gate_log = log.entries
    task = torch.zeros((), device=logits.device)
    pos = None if scored is None else scored(ids)
    if pos is not None and not bool(pos.any()):
        task = task + 0.0 * logits.sum()  # nothing to score in this micro-batch (no answer): no task gradient
    else:
        if "ce" in a.objective.split("+"):
            task = task + (_ce(logits, ids) if pos is None else _ce(logits, ids, pos))
        if teacher_logits is not None:
            task = task + distillation_kl(logits, teacher_logits, pos)
    sp = sparsity(gate_log, a.sparsity_kind, a.kl_target)
    loss = (task + a.lam * sp) / a.grad_accum
    # Decided together, so that no rank waits forever in an all-reduce its peers left.
    if gdist.any_rank(not bool(torch.isfinite(loss)), d):
        raise GateSkipError(f"loss became non-finite ({loss.item()} here) at step {step + 1}: training "
                            f"stopped; lower --lr or --lam. {_last_good(ckpt, last_good)}")
    with model.no_sync() if sync else contextlib.nullcontext():
        loss.backward()
    n = a.grad_accum
    return {"loss": loss.item(), "task": task.item() / n, "sparsity": sp.item() / n, "skipped": skipped / n,
            "gate_mean": float(torch.stack([g.detach().mean() for g, _ in gate_log]).mean()) / n}


def _checkpoint(net, opt, stream, ckpt: Path, step: int, a: TrainArgs, ramp_steps: int, last_good: int, d,
                fsdp: bool) -> None:
    """The checkpoint after ``step`` (rank 0 writes; under FSDP every rank gathers); a failed write stops
    training with a one-line error on every rank."""
    error = None
    # Under FSDP gathering the full state is a collective: every rank takes part, rank 0 writes.
    weights = gdist.gathered_trainable(net, opt) if fsdp else None
    if d.is_main:
        try:
            save_checkpoint(ckpt, net, opt, stream, step + 1, keep=a.keep_checkpoints,
                            schedule={"steps": a.steps, "warmup": a.warmup, "ramp_steps": ramp_steps,
                                      "max_ratio": a.max_ratio, "min_ratio": a.min_ratio}, gathered=weights)
        except OSError as e:
            error = e
    if gdist.any_rank(error is not None, d):
        why = f" ({error.strerror or error})" if error is not None else " on rank 0"
        raise GateSkipError(f"could not write the checkpoint of step {step + 1}{why}: free disk space in "
                            f"{ckpt} and run again (it resumes). {_last_good(ckpt, last_good)}") from None


def _check_fsdp(net, d: gdist.Dist, backbone: str, objective: str) -> None:
    if not d.enabled:
        raise GateSkipError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
    if gate_state(net).cfg.shared:
        raise GateSkipError("--fsdp cannot shard gates shared by all layers (GateSkipConfig(shared=True)): use per-layer gates")
    if backbone == "full" and "distill" in objective:
        raise GateSkipError("--fsdp with --backbone full and distillation would keep an unsharded teacher copy: "
                            "use --objective ce or --backbone lora")


def _ce(logits, ids, pos=None):
    # Indirection so that tests can inject a non-finite loss. ``pos``: scored positions (their next tokens)
    if pos is None:
        return next_token_ce(logits, ids)
    return next_token_ce(logits, ids, torch.cat([torch.zeros_like(pos[:, :1]), pos[:, :-1]], 1))


def _last_good(ckpt: Path | None, step: int) -> str:
    if ckpt is None:
        return "No checkpoint was written (no output folder)."
    if step == 0:
        return "No checkpoint had been written yet."
    return f"The last good checkpoint (step {step}) is in {ckpt}."


def _warn(message: str) -> None:
    print(f"gateskip: warning: {message}", file=sys.stderr)


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a kill
    atomic_write(log_path, lambda p: Path(p).write_text("".join(x + "\n" for x in keep)))


def _skipped_fraction(st) -> float:
    c = st.counts
    return float(c[:, 0].sum() / c[:, 1].sum().clamp(min=1)) if c is not None else 0.0

