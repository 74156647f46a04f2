"""Gate training as one plain function (the CLI's ``gateskip train`` calls it).

Each step: forward with skipping already active (quantile policy, masked path, budget ramping
linearly from 0 to ``max_ratio`` over ``ramp_steps``), loss = objective + lam * sparsity(gates).
Objective ``ce`` is next-token cross-entropy (paper); ``distill`` is KL to the gate-free model's
own logits on the same text (no labels needed, and it asks exactly "behave like the dense model
while skipping"); ``ce+distill`` sums both.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gateskip import distributed as gdist
from gateskip.allocate import read_budget
from gateskip.checkpoint import atomic_write, save_gates
from gateskip.config import GateSkipConfig
from gateskip.core import (
    add_gates,
    calibrate,
    gate_parameters,
    gate_state,
    gates_bypassed,
    is_gated,
    skipping,
)
from gateskip.errors import GateSkipError
from gateskip.fallback import fallback_parameters
from gateskip.lora import LoraDisabled, attach_lora, merge_lora
from gateskip.losses import check_sparsity_kind, distillation_kl, next_token_ce, sparsity
from gateskip.policies import check_ratio
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


def _check_ladder(min_ratio: float | None, max_ratio: float, budget) -> None:
    if min_ratio is None:
        return
    if budget:
        raise GateSkipError("min_ratio (a budget ladder) and budget (fixed per-branch ratios) exclude each other: "
                            "pass one")
    if not 0.0 <= min_ratio <= max_ratio:
        raise GateSkipError(f"min_ratio={min_ratio} is invalid: use 0 <= min_ratio <= max_ratio ({max_ratio})")


def train(model: str = "smollm2-135m", out: str = "runs/gates", data: str = "mix", steps: int = 300,
          seq_len: int = 256, batch_size: int = 4, grad_accum: int = 1, lr: float = 1e-3,
          backbone: str = "lora", backbone_lr: float = 1e-3, lora_rank: int = 8,
          objective: str = "distill", sparsity_kind: str = "l2", lam: float = 0.0, kl_target: float = 0.5,
          max_ratio: float = 0.4, min_ratio: float | None = None, ramp_steps: int | None = None,
          modules: str = "attn,mlp", warmup: int = 20, gate: str = "lowrank", rank: int = 16, init_bias: float = 5.0, init_std: float = 0.01, kv: str = "compute",
          placement: str = "after", shared: bool = False,
          calibrate_ratio: float = 0.3, calibrate_batches: int = 8, save_every: int = 50, seed: int = 0,
          dtype: str = "float32", resume: bool = True, limit_texts: int | None = None, fsdp: bool = False,
          keep_checkpoints: int = 2, device: str = "auto", protect_first: int = 1, quant: str = "none",
          straight_through: bool = False, init: str | None = "fit", budget: str | None = None,
          fallback: str | None = None, fallback_rank: int = 64, fallback_batches: int = 8, train_fallback: bool = True,
          fallback_lr: float = 1e-4, fit_ratio: float = 0.3, save_dtype: str = "float32",
          fallback_mlp: str | None = None) -> Path:
    """Train gates on offline text and write a gates folder.

    The defaults are the best measured recipe on SmolLM2-135M (BENCHMARKS.md, "Healing"): low-rank fallbacks
    and gates fitted in closed form (``init="fit"``, as ``gateskip fit``), then trained end to end by
    self-distillation with LoRA on the backbone, skipping 40% of every branch's tokens (no sparsity penalty:
    the budget sets the skipping). The paper's recipe is one flag away: ``--config paper`` (vector gates,
    zero for skipped tokens, cross-entropy + 0.1 L2 sparsity, ratio ramped to 0.2, full fine-tuning).

    Args:
        model: base model: ``smollm2-135m`` (embedded), a local HF folder or a hub id.
        out: output folder (gates.safetensors, gateskip.json, train_log.jsonl, checkpoint/).
        data: training text: boolq, lambada, shakespeare, mix, a .txt/.jsonl file, or a dataset.
        steps: optimizer steps.
        seq_len: tokens per packed row.
        batch_size: rows per micro-batch on each process (torchrun: the global batch is N times this).
        grad_accum: micro-batches per optimizer step.
        lr: learning rate of the gates.
        backbone: frozen (gates only), lora (LoRA adapters via peft + gates) or full.
        backbone_lr: learning rate of LoRA / backbone weights.
        lora_rank: LoRA rank for ``backbone=lora``.
        objective: ce, distill (KL to the gate-free model) or ce+distill.
        sparsity_kind: l2 (paper), l1 or kl (to ``kl_target`` open rate).
        lam: weight of the sparsity penalty.
        kl_target: target open rate for ``sparsity_kind=kl``.
        max_ratio: skip ratio reached at the end of the ramp (paper: 0.2).
        min_ratio: a budget ladder: each step skips a ratio drawn uniformly from [min_ratio, max_ratio], so one
            folder serves every budget in between; None: ``max_ratio`` every step.
        ramp_steps: steps of the linear ramp 0 -> max_ratio (default: 80% of steps).
        modules: branch kinds that skip during training, comma-separated (both kinds always get gates).
        warmup: learning-rate warm-up steps.
        gate: gate kind: vector, scalar, lowrank or mlp.
        rank: rank of lowrank gates.
        init_bias: gate bias at init.
        init_std: gate weight init std.
        kv: K/V of skipped attention tokens, in training and (recorded in the gates folder) at inference:
            compute (their own K/V; default, see docs) or copy (from the layer below, the paper's).
        placement: after (gate multiplies the branch output, paper) or before (gates its input).
        shared: one gate per module kind shared by all layers instead of one per layer.
        protect_first: never skip the first N tokens of a sequence (BOS, the attention sink), in
            training and (recorded in the gates folder) at inference; 0 is the paper's setting.
        quant: train the gates on a 4-bit (int4) or 8-bit (int8) weight-only quantized backbone (frozen;
            gateskip.quantize), e.g. to run them quantized later: ``eval --quant int4``. none: float.
        straight_through: a skipped token's gate still receives the task gradient it would get if the
            token were kept (its output stays 0). Without it, a skipped token's gate only feels the
            sparsity penalty, so skipped tokens tend to stay skipped. Not in the paper; placement=after only.
        calibrate_ratio: ratio at which thresholds are calibrated after training (on held-out text).
        calibrate_batches: batches of held-out text for calibration.
        save_every: checkpoint interval in steps.
        seed: random seed (data order, init).
        dtype: float32 or bfloat16 for the backbone.
        resume: continue from out/checkpoint if present.
        limit_texts: use at most this many training texts.
        fsdp: shard model, gates and optimizer state with FSDP2 across torchrun processes (for models whose
            weights plus gate training state do not fit one GPU; see docs/distributed.md).
        keep_checkpoints: newest checkpoints kept on disk (>= 2 keeps a fallback if the latest is damaged).
        device: auto (a GPU when there is one), cpu, cuda or cuda:N; under torchrun each process uses its LOCAL_RANK GPU.
        init: fit: new gates (the flags above), their fallbacks and gates fitted in closed form on
            ``fallback_batches`` training batches and refitted under skipping ``fit_ratio`` (``gateskip fit``'s
            recipe; kept in out/fit, reused on resume); a gates folder (e.g. from ``gateskip fit``): start from
            it, its config kept and the gate flags above ignored; none: new gates as initialised (the paper).
        budget: JSON file of per-branch skip ratios (e.g. ``alloc_0.25.json`` from ``gateskip fit --allocate``):
            training skips those ratios, ramped from 0 over ``ramp_steps`` (``max_ratio`` is then unused), and
            thresholds are calibrated under them.
        fallback: what a skipped token gets: zero (paper), mean, lowrank or linear, fitted in closed form
            (gateskip.fit_fallback) on the training text before training; default: lowrank for new gates, the
            folder's own with --init DIR (given, it replaces the folder's unless the same).
        fallback_rank: inner size of a lowrank fallback.
        fallback_mlp: the MLP branches' fallback when it differs from ``fallback`` (new or refitted fallbacks
            only), e.g. lowrank for attention and linear for the MLPs.
        fallback_batches: batches of batch_size x seq_len training tokens the fallback (and with init=fit, the
            gates) are fitted on.
        train_fallback: train the fallbacks end to end with the gates (learning rate ``fallback_lr``; nothing to
            train with fallback zero).
        fallback_lr: learning rate of the fallbacks.
        fit_ratio: init=fit: the skip ratio (every branch, quantile) the closed-form fit is refitted under.
        save_dtype: how the gates folder stores gates, fallbacks and LoRA deltas: float32, float16 or bfloat16
            (half the size; loading casts them back).
    """
    from gateskip.data import load_texts, pack
    from gateskip.models import load_model

    if backbone not in BACKBONES:
        raise GateSkipError(f"backbone={backbone!r} is not supported: choose one of {', '.join(BACKBONES)}")
    if objective not in OBJECTIVES:
        raise GateSkipError(f"objective={objective!r} is not supported: choose one of {', '.join(OBJECTIVES)}")
    check_sparsity_kind(sparsity_kind)
    for name, value, least in (("steps", steps, 1), ("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1),
                               ("seq_len", seq_len, 2), ("save_every", save_every, 1),
                               ("keep_checkpoints", keep_checkpoints, 1), ("calibrate_batches", calibrate_batches, 1)):
        if value < least:
            raise GateSkipError(f"{name}={value} is invalid: use a value >= {least}")
    check_ratio(max_ratio, "max_ratio")
    _check_ladder(min_ratio, max_ratio, budget)
    from gateskip.checkpoint import SAVE_DTYPES

    if save_dtype not in SAVE_DTYPES:  # fail now, not after training
        raise GateSkipError(f"unknown --save-dtype {save_dtype!r}: choose from {', '.join(SAVE_DTYPES)}")
    if straight_through and placement != "after":
        raise GateSkipError("--straight-through needs gates after the branch (placement=after): a gate before it "
                            "changes the branch input, so a skipped token has no output to pass the gradient through")
    from gateskip.loading import quantize_for_run
    from gateskip.quantize import check_quant

    if check_quant(quant) and (backbone != "frozen" or fsdp):
        raise GateSkipError(f"--quant {quant} trains gates on a frozen quantized backbone: use --backbone frozen "
                            "without --fsdp (LoRA / full fine-tuning of rounded weights is not supported)")
    skip_modules = tuple(m.strip() for m in modules.split(",") if m.strip())
    init = None if init in (None, "", "none") else init
    if fallback is None:
        fallback = "lowrank" if init is None or init == "fit" else "keep"
    if fallback == "keep" and fallback_mlp:
        raise GateSkipError("--fallback-mlp sets the kind of new fallbacks: pass --fallback too (e.g. lowrank)")
    if init == "fit" and fallback == "zero" and fallback_mlp in (None, "zero"):
        raise GateSkipError("--init fit fits fallbacks and gates in closed form: pass --fallback lowrank (or mean, "
                            "linear), or --init none for new gates with zero fallbacks")
    if init == "fit" and (gate == "mlp" or placement != "after" or shared):
        raise GateSkipError(f"--init fit writes a fitted cost predictor into one gate per branch placed after it: "
                            f"gate={gate!r}, placement={placement!r}, shared={shared} cannot hold it; pass --gate "
                            "lowrank/vector/scalar --placement after --no-shared, or --init none for new gates")
    if init is not None and init != "fit" and not Path(init, "gateskip.json").is_file():
        raise GateSkipError(f"--init {init!r} is not a gates folder (no gateskip.json): pass a folder written by "
                            "gateskip fit / train, fit (closed-form start) or none")
    # fitted gates need only a short ramp; new gates the paper's long one
    ramp_steps = ramp_steps if ramp_steps is not None else max(1, int((0.8 if init is None else 0.1) * steps))
    if init not in (None, "fit") and fsdp:
        raise GateSkipError("--init DIR with --fsdp is not supported: start from new gates (--init fit or none), or "
                            "train without --fsdp")
    budget_ratios = read_budget(budget) if budget else None  # allocate.py
    gate_cfg = GateSkipConfig(gate=gate, rank=rank, init_bias=init_bias, init_std=init_std, kv=kv,
                              placement=placement, shared=shared, protect_first=protect_first,
                              fallback="zero" if fallback == "keep" else fallback, fallback_rank=fallback_rank,
                              fallback_mlp=None if fallback == "keep" else fallback_mlp)
    out_dir = Path(out)
    d = gdist.init_from_env()
    if fsdp and not d.enabled:
        raise GateSkipError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
    try:
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        _seed_all(seed)
        dev = d.device if d.enabled else _device(device)
        net, tok = load_model(model, dtype=dtype)
        quantize_for_run(net, quant)  # no-op for none; gates stay float32 either way
        if init == "fit":
            _fitted_start(net, tok, gate_cfg, out_dir / "fit", data=data, limit_texts=limit_texts, seq_len=seq_len,
                          batch_size=batch_size, batches=fallback_batches, ratio=fit_ratio, resume=resume,
                          main=d.is_main)
        elif init is not None:
            from gateskip.checkpoint import load_gates

            load_gates(net, init)
        else:
            add_gates(net, gate_cfg)
        net.to(dev)
        st = gate_state(net)
        if fallback not in ("zero", "keep") and init != "fit" and (
                init is None or (st.cfg.fallback, st.cfg.fallback_mlp, st.cfg.fallback_rank)
                != (fallback, fallback_mlp, fallback_rank)):
            from gateskip.data import fixed_batches
            from gateskip.fallback_fit import fit_fallback

            fb = fit_fallback(net, fixed_batches(tok, load_texts(data, split="train", limit=limit_texts), seq_len,
                                                 batch_size, fallback_batches), kind=fallback, rank=fallback_rank,
                              mlp_kind=fallback_mlp)
            if d.is_main:
                print(f"[gateskip train] fitted {gate_state(net).cfg.fallback_name()} fallbacks on {fb['tokens']} "
                      "tokens", flush=True)
        # Every rank reads the same global batches (world x batch_size rows) and keeps its own slice.
        stream = pack(tok, load_texts(data, split="train", limit=limit_texts), seq_len=seq_len,
                      batch_size=batch_size * d.world, seed=seed)
        peft_model = fit(net, stream, steps=steps, out=out_dir, grad_accum=grad_accum, lr=lr, backbone=backbone,
                         backbone_lr=backbone_lr, lora_rank=lora_rank, objective=objective,
                         sparsity_kind=sparsity_kind, lam=lam, kl_target=kl_target, max_ratio=max_ratio,
                         min_ratio=min_ratio, ramp_steps=ramp_steps, modules=skip_modules, warmup=warmup,
                         save_every=save_every, resume=resume, seed=seed, dist=d, keep_checkpoints=keep_checkpoints, fsdp=fsdp,
                         straight_through=straight_through, budget=budget_ratios,
                         train_fallback=train_fallback and st.cfg.has_fallback,
                         fallback_lr=fallback_lr)
        if fsdp:  # gather the sharded weights (a collective); rank 0 calibrates an unsharded copy
            full = gdist.full_state(net)
            if d.is_main:
                net, _ = load_model(model, dtype=dtype)
                add_gates(net, gate_cfg)
                peft_model = attach_lora(net, lora_rank) if backbone == "lora" else None
                net.load_state_dict(full)
                net.eval()
        if not d.is_main:  # rank 0 alone calibrates and writes the gates folder
            gdist.barrier(d)
            return out_dir
        _finish(net, tok, peft_model, out_dir, data=data, backbone=backbone,
                calibrate_ratio=budget_ratios if budget_ratios else calibrate_ratio,
                calibrate_batches=calibrate_batches, seq_len=seq_len, batch_size=batch_size, save_dtype=save_dtype,
                meta_training={"quant": quant, "data": data, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
                               "world_size": d.world, "grad_accum": grad_accum, "lr": lr, "objective": objective,
                               "sparsity": sparsity_kind, "lam": lam, "max_ratio": max_ratio,
                               "min_ratio": min_ratio, "ramp_steps": ramp_steps, "seed": seed, "straight_through": straight_through,
                               "init": init, "budget": budget, "train_fallback": train_fallback})
        gdist.barrier(d)
        return out_dir
    finally:
        gdist.shutdown(d)


def _fitted_start(net, tok, cfg: GateSkipConfig, folder: Path, *, data, limit_texts, seq_len, batch_size, batches,
                  ratio, resume, main) -> None:
    """``init="fit"``: gates and fallbacks fitted in closed form (``gatefit.fit_closed_form``), saved in ``folder``;
    a resumed run loads that folder instead of fitting again."""
    from gateskip.checkpoint import load_gates

    if resume and (folder / "gateskip.json").is_file():
        load_gates(net, folder)
        return
    from gateskip.data import fixed_batches, load_texts
    from gateskip.gatefit import fit_closed_form

    add_gates(net, cfg)
    cal = fixed_batches(tok, load_texts(data, split="train", limit=limit_texts), seq_len, batch_size, batches)
    fit_closed_form(net, cal, fallback=cfg.fallback, fallback_rank=cfg.fallback_rank, fallback_mlp=cfg.fallback_mlp,
                    sequential=ratio,
                    sequential_batches=batches,
                    log=(lambda line: print(f"[gateskip train] init fit: {line}", flush=True)) if main else None)
    calibrate(net, cal[: min(4, len(cal))], ratio=ratio)
    if main:
        save_gates(net, folder, extra_meta={"fit": {"command": "gateskip train --init fit", "batches": batches,
                                                    "seq_len": seq_len, "batch_size": batch_size, "data": data,
                                                    "sequential": ratio}})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GateSkipError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GateSkipError(f"device={name!r} but no GPU is visible: use --device cpu")
    return dev


def _finish(net, tok, peft_model, out_dir: Path, *, data, backbone, calibrate_ratio, calibrate_batches, seq_len,
            batch_size, meta_training, save_dtype: str = "float32") -> None:
    """Merge LoRA, calibrate thresholds on held-out text and write the gates folder."""
    from gateskip.data import fixed_batches, load_texts

    extra = merge_lora(net, peft_model) if peft_model is not None else {}
    heldout = load_texts(data, split="heldout", limit=None)
    cal = calibrate(net, fixed_batches(tok, heldout, seq_len, batch_size, calibrate_batches), ratio=calibrate_ratio)
    meta = {"backbone": backbone, "training": {**meta_training, "calibration": cal}}
    save_gates(net, out_dir, extra_tensors=extra, extra_meta=meta, dtype=save_dtype)
    if backbone == "full":
        from safetensors.torch import save_file
        changed = {k: v.detach().float().cpu().clone() for k, v in net.named_parameters() if ".gate." not in k}
        atomic_write(out_dir / "backbone.safetensors", lambda p: save_file(changed, p))


def fit(net, stream, *, steps: int, out: Path | None = None, grad_accum: int = 1, lr: float = 1e-3,
        backbone: str = "frozen", backbone_lr: float = 1e-4, lora_rank: int = 8, objective: str = "distill",
        sparsity_kind: str = "l2", lam: float = 0.1, kl_target: float = 0.5, max_ratio: float = 0.2,
        min_ratio: float | None = None, ramp_steps: int | None = None, modules: tuple[str, ...] = ("attn", "mlp"),
        warmup: int = 20, save_every: int = 50, resume: bool = True, seed: int = 0, dist: gdist.Dist | None = None, keep_checkpoints: int = 2,
        fsdp: bool = False, straight_through: bool = False, budget: dict | None = None,
        train_fallback: bool = False, fallback_lr: float = 1e-4):
    """The training loop on a gated model and an iterator of ``input_ids`` batches.

    Returns the model with LoRA layers still attached (or None): ``train`` merges them. Writes
    ``train_log.jsonl`` and resumable checkpoints under ``out`` when given. With ``dist`` (several
    torchrun processes) each batch from ``stream`` is the global batch: every rank trains on its
    slice, gradients are averaged by DDP, logs are averaged over ranks, and only rank 0 writes.
    ``fsdp`` shards the model with FSDP2 instead of replicating it (see docs/distributed.md).
    ``straight_through``: see ``train``. ``budget``: per-branch ratios reached at the end of the ramp
    (instead of ``max_ratio`` for every branch). ``train_fallback``: the fallbacks train too (``fallback_lr``).
    ``min_ratio``: a budget ladder, each step's ratio drawn from [min_ratio, max_ratio] (``ramp_ratio``).
    """
    d = dist or gdist.SINGLE
    if backbone not in BACKBONES:
        raise GateSkipError(f"backbone={backbone!r} is not supported: choose one of {', '.join(BACKBONES)}")
    if objective not in OBJECTIVES:
        raise GateSkipError(f"objective={objective!r} is not supported: choose one of {', '.join(OBJECTIVES)}")
    _check_ladder(min_ratio, max_ratio, budget)
    if not is_gated(net):
        raise GateSkipError("fit() needs a gated model: call gateskip.add_gates(model) first")
    if steps < 1:
        raise GateSkipError(f"steps={steps} is invalid: train for at least 1 step")
    if fsdp:
        _check_fsdp(net, d, backbone, objective)
    ramp_steps = ramp_steps if ramp_steps is not None else max(1, int(0.8 * steps))
    skip_modules = tuple(modules)
    teacher = None
    if "distill" in objective and backbone == "full":
        teacher = copy.deepcopy(net)  # the backbone moves: keep the original as the teacher
    for p in net.parameters():
        p.requires_grad_(False)
    peft_model = None
    if backbone == "lora":
        peft_model = attach_lora(net, lora_rank)
    elif backbone == "full":
        for p in net.parameters():
            p.requires_grad_(True)
    for p in gate_parameters(net):
        p.requires_grad_(True)
    fallbacks = fallback_parameters(net) if train_fallback else []
    if train_fallback and not fallbacks:
        raise GateSkipError("--train-fallback needs fallbacks: pass --fallback mean, lowrank or linear")
    for p in fallbacks:
        p.requires_grad_(True)
    if fsdp:  # shard before the optimizer is built, so that it holds (and shards) the DTensor parameters
        gdist.shard_model(net)
    gates = gate_parameters(net)
    fb_ids = {id(p) for p in fallbacks}
    gate_ids = {id(p) for p in gates} | fb_ids
    other = [p for p in net.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": gates, "lr": lr, "base_lr": lr}]
    if fallbacks:
        groups.append({"params": [p for p in net.parameters() if id(p) in fb_ids], "lr": fallback_lr,
                       "base_lr": fallback_lr})
    if other:
        groups.append({"params": other, "lr": backbone_lr, "base_lr": backbone_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.001)

    start = 0
    ckpt = Path(out) / "checkpoint" if out is not None else None
    if resume and ckpt is not None:
        start = load_checkpoint(ckpt, net, opt, stream, warn=_warn if d.is_main else None, fsdp=fsdp)
    last_good = start
    log_path = None
    if out is not None and d.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_path = Path(out) / "train_log.jsonl"
        _truncate_log(log_path, start)  # rows past the checkpoint are re-done: do not log them twice
    st = gate_state(net)
    device = next(net.parameters()).device
    # DDP all-reduces (averages) the trainable gradients during backward; rank 0's weights are
    # broadcast at construction, so ranks start identical even if their seeds differed.
    # Under FSDP the model itself is sharded and reduces gradients (reduce-scatter) on its own.
    model = torch.nn.parallel.DistributedDataParallel(net) if d.enabled and not fsdp else net
    net.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train gates", dynamic_ncols=True,
               disable=not d.is_main)
    for step in bar:
        ratio = ramp_ratio(step, ramp_steps, 1.0 if budget else max_ratio, min_ratio, seed)
        plan_ratio = {k: v * ratio for k, v in budget.items()} if budget else ratio
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, group["base_lr"])
        t0 = time.time()
        totals = {"loss": 0.0, "task": 0.0, "sparsity": 0.0, "gate_mean": 0.0, "skipped": 0.0}
        for micro in range(grad_accum):
            ids = gdist.shard(next(stream), d).to(device)
            teacher_logits = None
            if "distill" in objective:
                with torch.no_grad():
                    if teacher is not None:
                        with gates_bypassed(teacher):
                            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    else:
                        with gates_bypassed(net), LoraDisabled(peft_model):
                            teacher_logits = net(input_ids=ids, use_cache=False).logits
            st.collect = True
            try:
                with skipping(net, ratio=plan_ratio, policy="quantile", modules=skip_modules,
                              straight_through=straight_through):
                    logits = model(input_ids=ids, use_cache=False).logits
                    gate_log = st.gate_log
                    skipped = _skipped_fraction(st)
            finally:
                st.collect = False
            task = torch.zeros((), device=logits.device)
            if "ce" in objective.split("+"):
                task = task + _ce(logits, ids)
            if teacher_logits is not None:
                task = task + distillation_kl(logits, teacher_logits)
            sp = sparsity(gate_log, sparsity_kind, kl_target)
            loss = (task + lam * sp) / grad_accum
            # Decided together, so that no rank waits forever in an all-reduce its peers left.
            if gdist.any_rank(not bool(torch.isfinite(loss)), d):
                raise GateSkipError(f"loss became non-finite ({loss.item()} here) at step {step + 1}: training "
                                    f"stopped; lower --lr or --lam. {_last_good(ckpt, last_good)}")
            sync = d.enabled and not fsdp and micro < grad_accum - 1
            with model.no_sync() if sync else contextlib.nullcontext():
                loss.backward()
            totals["loss"] += loss.item()
            totals["task"] += task.item() / grad_accum
            totals["sparsity"] += sp.item() / grad_accum
            totals["gate_mean"] += float(torch.stack([g.detach().mean() for g, _ in gate_log]).mean()) / grad_accum
            totals["skipped"] += skipped / grad_accum
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
        if ckpt is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            error = None
            # Under FSDP gathering the full state is a collective: every rank takes part, rank 0 writes.
            weights = gdist.gathered_trainable(net, opt) if fsdp else None
            if d.is_main:
                try:
                    save_checkpoint(ckpt, net, opt, stream, step + 1, keep=keep_checkpoints,
                                     schedule={"steps": steps, "warmup": warmup, "ramp_steps": ramp_steps,
                                               "max_ratio": max_ratio, "min_ratio": min_ratio}, gathered=weights)
                except OSError as e:
                    error = e
            if gdist.any_rank(error is not None, d):
                why = f" ({error.strerror or error})" if error is not None else " on rank 0"
                raise GateSkipError(f"could not write the checkpoint of step {step + 1}{why}: free disk space in "
                                    f"{ckpt} and run again (it resumes). {_last_good(ckpt, last_good)}") from None
            last_good = step + 1
    net.eval()
    return peft_model


def _check_fsdp(net, d: gdist.Dist, backbone: str, objective: str) -> None:
    if not d.enabled:
        raise GateSkipError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
    if gate_state(net).cfg.shared:
        raise GateSkipError("--fsdp cannot shard gates shared by all layers (GateSkipConfig(shared=True)): use per-layer gates")
    if backbone == "full" and "distill" in objective:
        raise GateSkipError("--fsdp with --backbone full and distillation would keep an unsharded teacher copy: "
                            "use --objective ce or --backbone lora")


def _ce(logits, ids):
    # Indirection so that tests can inject a non-finite loss.
    return next_token_ce(logits, ids)


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
