"""Gate training as one plain function (the CLI's ``gateskip train`` calls it).

Each step: forward with skipping already active (quantile policy, masked path, budget ramping
linearly from 0 to ``max_ratio`` over ``ramp_steps``), loss = objective + lam * sparsity(gates).
Objective ``ce`` is next-token cross-entropy (paper); ``distill`` is KL to the gate-free model's
own logits on the same text (no labels needed, and it asks exactly "behave like the dense model
while skipping"); ``ce+distill`` sums both.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

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
from gateskip.losses import distillation_kl, next_token_ce, sparsity
from gateskip.policies import check_ratio

BACKBONES = ("frozen", "lora", "full")
OBJECTIVES = ("ce", "distill", "ce+distill")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ramp_ratio(step: int, ramp_steps: int, max_ratio: float) -> float:
    """Skip ratio during training: rises linearly from 0 to ``max_ratio`` over ``ramp_steps``."""
    return max_ratio * min(1.0, step / max(1, ramp_steps))


def train(model: str = "smollm2-135m", out: str = "runs/gates", data: str = "mix", steps: int = 200,
          seq_len: int = 256, batch_size: int = 4, grad_accum: int = 1, lr: float = 1e-3,
          backbone: str = "frozen", backbone_lr: float = 1e-4, lora_rank: int = 8,
          objective: str = "distill", sparsity_kind: str = "l2", lam: float = 0.1, kl_target: float = 0.5,
          max_ratio: float = 0.2, ramp_steps: int | None = None, modules: str = "attn,mlp", warmup: int = 20,
          gate: str = "vector", rank: int = 16, init_bias: float = 5.0, init_std: float = 0.01, kv: str = "compute",
          calibrate_ratio: float = 0.3, calibrate_batches: int = 8, save_every: int = 50, seed: int = 0,
          dtype: str = "float32", resume: bool = True, limit_texts: int | None = None) -> Path:
    """Train gates on offline text and write a gates folder.

    Args:
        model: base model: ``smollm2-135m`` (embedded), a local HF folder or a hub id.
        out: output folder (gates.safetensors, gateskip.json, train_log.jsonl, checkpoint/).
        data: training text: boolq, lambada, shakespeare, mix, a .txt/.jsonl file, or a dataset.
        steps: optimizer steps.
        seq_len: tokens per packed row.
        batch_size: rows per micro-batch.
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
        ramp_steps: steps of the linear ramp 0 -> max_ratio (default: 80% of steps).
        modules: branch kinds that skip during training, comma-separated.
        warmup: learning-rate warm-up steps.
        gate: gate kind: vector, scalar, lowrank or mlp.
        rank: rank of lowrank gates.
        init_bias: gate bias at init.
        init_std: gate weight init std.
        kv: K/V of skipped attention tokens, in training and (recorded in the gates folder) at inference:
            compute (their own K/V; default, see docs) or copy (from the layer below, the paper's).
        calibrate_ratio: ratio at which thresholds are calibrated after training (on held-out text).
        calibrate_batches: batches of held-out text for calibration.
        save_every: checkpoint interval in steps.
        seed: random seed (data order, init).
        dtype: float32 or bfloat16 for the backbone.
        resume: continue from out/checkpoint if present.
        limit_texts: use at most this many training texts.
    """
    from gateskip.data import fixed_batches, load_texts, pack
    from gateskip.models import load_model

    if backbone not in BACKBONES:
        raise GateSkipError(f"backbone={backbone!r} is not supported: choose one of {', '.join(BACKBONES)}")
    if objective not in OBJECTIVES:
        raise GateSkipError(f"objective={objective!r} is not supported: choose one of {', '.join(OBJECTIVES)}")
    if steps < 1 or batch_size < 1 or grad_accum < 1 or seq_len < 2:
        raise GateSkipError("steps, batch_size and grad_accum must be >= 1 and seq_len >= 2")
    check_ratio(max_ratio, "max_ratio")
    skip_modules = tuple(m.strip() for m in modules.split(",") if m.strip())
    ramp_steps = ramp_steps if ramp_steps is not None else max(1, int(0.8 * steps))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_all(seed)

    net, tok = load_model(model, dtype=dtype)
    add_gates(net, GateSkipConfig(gate=gate, rank=rank, init_bias=init_bias, init_std=init_std, kv=kv))
    stream = pack(tok, load_texts(data, split="train", limit=limit_texts), seq_len=seq_len, batch_size=batch_size,
                  seed=seed)
    peft_model = fit(net, stream, steps=steps, out=out_dir, grad_accum=grad_accum, lr=lr, backbone=backbone,
                     backbone_lr=backbone_lr, lora_rank=lora_rank, objective=objective, sparsity_kind=sparsity_kind,
                     lam=lam, kl_target=kl_target, max_ratio=max_ratio, ramp_steps=ramp_steps,
                     modules=skip_modules, warmup=warmup, save_every=save_every, resume=resume)
    extra = _merge_lora(net, peft_model) if peft_model is not None else {}
    heldout = load_texts(data, split="heldout", limit=None)
    cal = calibrate(net, fixed_batches(tok, heldout, seq_len, batch_size, calibrate_batches), ratio=calibrate_ratio)
    meta = {"backbone": backbone, "training": {"data": data, "steps": steps, "seq_len": seq_len,
                                               "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                                               "objective": objective, "sparsity": sparsity_kind, "lam": lam,
                                               "max_ratio": max_ratio, "ramp_steps": ramp_steps, "seed": seed,
                                               "calibration": cal}}
    save_gates(net, out_dir, extra_tensors=extra, extra_meta=meta)
    if backbone == "full":
        from safetensors.torch import save_file
        changed = {k: v.detach().float().cpu().clone() for k, v in net.named_parameters() if ".gate." not in k}
        atomic_write(out_dir / "backbone.safetensors", lambda p: save_file(changed, p))
    return out_dir


def fit(net, stream, *, steps: int, out: Path | None = None, grad_accum: int = 1, lr: float = 1e-3,
        backbone: str = "frozen", backbone_lr: float = 1e-4, lora_rank: int = 8, objective: str = "distill",
        sparsity_kind: str = "l2", lam: float = 0.1, kl_target: float = 0.5, max_ratio: float = 0.2,
        ramp_steps: int | None = None, modules: tuple[str, ...] = ("attn", "mlp"), warmup: int = 20,
        save_every: int = 50, resume: bool = True):
    """The training loop on a gated model and an iterator of ``input_ids`` batches.

    Returns the model with LoRA layers still attached (or None): ``train`` merges them. Writes
    ``train_log.jsonl`` and resumable checkpoints under ``out`` when given.
    """
    if backbone not in BACKBONES:
        raise GateSkipError(f"backbone={backbone!r} is not supported: choose one of {', '.join(BACKBONES)}")
    if objective not in OBJECTIVES:
        raise GateSkipError(f"objective={objective!r} is not supported: choose one of {', '.join(OBJECTIVES)}")
    if not is_gated(net):
        raise GateSkipError("fit() needs a gated model: call gateskip.add_gates(model) first")
    ramp_steps = ramp_steps if ramp_steps is not None else max(1, int(0.8 * steps))
    skip_modules = tuple(modules)
    teacher = None
    if "distill" in objective and backbone == "full":
        teacher = copy.deepcopy(net)  # the backbone moves: keep the original as the teacher
    for p in net.parameters():
        p.requires_grad_(False)
    peft_model = None
    if backbone == "lora":
        peft_model = _attach_lora(net, lora_rank)
    elif backbone == "full":
        for p in net.parameters():
            p.requires_grad_(True)
    gates = gate_parameters(net)
    for p in gates:
        p.requires_grad_(True)
    gate_ids = {id(p) for p in gates}
    other = [p for p in net.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [{"params": gates, "lr": lr, "base_lr": lr}]
    if other:
        groups.append({"params": other, "lr": backbone_lr, "base_lr": backbone_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.001)

    start = 0
    ckpt = Path(out) / "checkpoint" if out is not None else None
    if resume and ckpt is not None and (ckpt / "train_state.pt").is_file():
        start = _load_checkpoint(ckpt, net, opt, stream)
    log_path = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        log_path = Path(out) / "train_log.jsonl"
    st = gate_state(net)
    net.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train gates", dynamic_ncols=True)
    for step in bar:
        ratio = ramp_ratio(step, ramp_steps, max_ratio)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, group["base_lr"])
        t0 = time.time()
        totals = {"loss": 0.0, "task": 0.0, "sparsity": 0.0, "gate_mean": 0.0, "skipped": 0.0}
        for _ in range(grad_accum):
            ids = next(stream)
            teacher_logits = None
            if "distill" in objective:
                with torch.no_grad():
                    if teacher is not None:
                        with gates_bypassed(teacher):
                            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    else:
                        with gates_bypassed(net), _lora_disabled(peft_model):
                            teacher_logits = net(input_ids=ids, use_cache=False).logits
            st.collect = True
            try:
                with skipping(net, ratio=ratio, policy="quantile", modules=skip_modules):
                    logits = net(input_ids=ids, use_cache=False).logits
                    gate_log = st.gate_log
                    skipped = _skipped_fraction(st)
            finally:
                st.collect = False
            task = torch.zeros((), device=logits.device)
            if "ce" in objective.split("+"):
                task = task + next_token_ce(logits, ids)
            if teacher_logits is not None:
                task = task + distillation_kl(logits, teacher_logits)
            sp = sparsity(gate_log, sparsity_kind, kl_target)
            loss = (task + lam * sp) / grad_accum
            if not torch.isfinite(loss):
                raise GateSkipError(f"loss became {loss.item()} at step {step}: lower lr or lam; the last good "
                                    f"checkpoint is in {ckpt}")
            loss.backward()
            totals["loss"] += loss.item()
            totals["task"] += task.item() / grad_accum
            totals["sparsity"] += sp.item() / grad_accum
            totals["gate_mean"] += float(torch.stack([g.detach().mean() for g, _ in gate_log]).mean()) / grad_accum
            totals["skipped"] += skipped / grad_accum
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "ratio": round(ratio, 4), **{k: round(v, 5) for k, v in totals.items()},
               "lr": opt.param_groups[0]["lr"], "sec": round(time.time() - t0, 2)}
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}", sp=f"{row['sparsity']:.3f}", gate=f"{row['gate_mean']:.3f}",
                        skip=f"{row['skipped']:.2f}")
        if ckpt is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            _save_checkpoint(ckpt, net, opt, stream, step + 1)
    net.eval()
    return peft_model


def _skipped_fraction(st) -> float:
    c = st.counts
    return float(c[:, 0].sum() / c[:, 1].sum().clamp(min=1)) if c is not None else 0.0


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- LoRA (peft) ---------------------------------------------------------------------------------

def _attach_lora(net, rank: int):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise GateSkipError("backbone=lora needs peft: pip install 'gateskip[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    inject_adapter_in_model(config, net)
    return net


class _lora_disabled:
    """Context: LoRA layers of ``net`` switched off (teacher = the original backbone)."""

    def __init__(self, net):
        self.layers = [] if net is None else [m for m in net.modules() if hasattr(m, "disable_adapters")
                                             and hasattr(m, "lora_A")]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


@torch.no_grad()
def _merge_lora(net, _peft_model) -> dict:
    """Fold LoRA into the base weights; return the deltas (``lora.<module>.A/B``) for the gates file."""
    tensors = {}
    for name, m in list(net.named_modules()):
        if not (hasattr(m, "lora_A") and hasattr(m, "base_layer")) or "default" not in m.lora_A:
            continue
        a = m.lora_A["default"].weight.detach().float()
        b = m.lora_B["default"].weight.detach().float() * m.scaling["default"]
        base = m.base_layer
        base.weight += (b @ a).to(base.weight.dtype)
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = a, b
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, base)
    return tensors


# ---- checkpoints ---------------------------------------------------------------------------------

def _save_checkpoint(ckpt: Path, net, opt, stream, step: int) -> None:
    trainable = {k: v.detach().cpu() for k, v in net.named_parameters() if v.requires_grad}
    data = stream.state_dict() if hasattr(stream, "state_dict") else {}
    state = {"step": step, "trainable": trainable, "optimizer": opt.state_dict(),
             "data": data, "torch_rng": torch.get_rng_state()}
    atomic_write(ckpt / "train_state.pt", lambda p: torch.save(state, p))


def _load_checkpoint(ckpt: Path, net, opt, stream) -> int:
    try:
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise GateSkipError(f"checkpoint {ckpt / 'train_state.pt'} is corrupt ({type(e).__name__}): delete it or "
                            "pass --no-resume") from None
    params = dict(net.named_parameters())
    missing = set(state["trainable"]) - set(params)
    if missing:
        raise GateSkipError(f"checkpoint in {ckpt} is for another configuration: delete it or use another --out")
    with torch.no_grad():
        for k, v in state["trainable"].items():
            params[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    if hasattr(stream, "load_state_dict"):
        stream.load_state_dict(state["data"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])

