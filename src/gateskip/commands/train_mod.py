"""``gateskip train-mod``: Mixture-of-Depths routers (baselines/mod.py) trained on offline text, saved as a folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gateskip.baselines.mod import add_mod, calibrate_mod, fit_mod, save_mod
from gateskip.core import gate_modules, gate_parameters
from gateskip.errors import GateSkipError


def train_mod(model: str = "smollm2-135m", out: str = "runs/mod", data: str = "mix", steps: int = 60,
              seq_len: int = 256, batch_size: int = 4, lr: float = 1e-3, capacity: float = 0.8, decay: float = 1500.0,
              objective: str = "distill", bce_weight: float = 1.0, predictor_hidden: int = 64, kv: str = "compute",
              warmup: int = 10, calibrate_batches: int = 4, save_every: int = 20, seed: int = 0, resume: bool = True,
              limit_texts: int | None = None, threads: int = 0) -> Path:
    """Train a Mixture-of-Depths router baseline on offline text and write a MoD folder for `gateskip eval --mod`.

    Args:
        model: base model: smollm2-135m (embedded), a local HF folder or a hub id.
        out: output folder (gates.safetensors, gateskip.json with method "mod", train_log.jsonl, checkpoint/).
        data: training text: boolq, lambada, shakespeare, mix, or a .txt/.jsonl file.
        steps: optimizer steps (one batch each).
        seq_len: tokens per packed row.
        batch_size: rows per step.
        lr: learning rate of routers and predictors (backbone frozen).
        capacity: final fraction of tokens each branch processes (paper: 0.8).
        decay: steps constant of the capacity schedule c + (1 - c) / (step / decay + 1) (paper: 1500).
        objective: ce (next-token cross-entropy) or distill (KL to the model without routers).
        bce_weight: weight of the predictor's BCE loss.
        predictor_hidden: hidden units of the causal predictor MLP.
        kv: K/V of skipped attention tokens: compute or copy (as gateskip train).
        warmup: learning-rate warm-up steps.
        calibrate_batches: batches of held-out text for the predictor's thresholds.
        save_every: checkpoint interval in steps.
        seed: data order seed.
        resume: continue from out/checkpoint if present.
        limit_texts: use at most this many training texts.
        threads: torch CPU threads (0: leave as is).
    """
    from gateskip.data import fixed_batches, load_texts, pack
    from gateskip.models import load_model

    _check(steps=steps, batch_size=batch_size, seq_len=seq_len, save_every=save_every,
           calibrate_batches=calibrate_batches, capacity=capacity)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    net, tok = load_model(model)
    add_mod(net, predictor_hidden=predictor_hidden, kv=kv)
    stream = pack(tok, load_texts(data, split="train", limit=limit_texts), seq_len=seq_len, batch_size=batch_size,
                  seed=seed)
    params = gate_parameters(net)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.001)
    ckpt, log_path = out_dir / "checkpoint", out_dir / "train_log.jsonl"
    start = _resume(net, opt, stream, ckpt, log_path, resume)
    if start < steps:
        fit_mod(net, stream, steps, lr=lr, capacity=capacity, decay=decay, objective=objective,
                bce_weight=bce_weight, warmup=warmup, start=start, opt=opt,
                on_step=_on_step(net, stream, ckpt, log_path, save_every, steps))
    cal = calibrate_mod(net, fixed_batches(tok, load_texts(data, split="heldout"), seq_len, batch_size,
                                           calibrate_batches), ratio=round(1.0 - capacity, 6))
    save_mod(net, out_dir, {"training": {"data": data, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
                                         "lr": lr, "capacity": capacity, "decay": decay, "objective": objective,
                                         "bce_weight": bce_weight, "seed": seed, "calibration": cal}})
    print(f"[gateskip] wrote MoD folder {out_dir}")
    return out_dir


def _check(steps: int, batch_size: int, seq_len: int, save_every: int, calibrate_batches: int,
           capacity: float) -> None:
    for name, value, least in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seq_len", seq_len, 2),
                               ("save_every", save_every, 1), ("calibrate_batches", calibrate_batches, 1)):
        if value < least:
            raise GateSkipError(f"{name}={value} is invalid: use a value >= {least}")
    if not 0.0 < capacity <= 1.0:
        raise GateSkipError(f"capacity={capacity} is invalid: use a fraction in (0, 1]")


def _resume(net, opt, stream, ckpt: Path, log_path: Path, resume: bool) -> int:
    """The step to start from: routers, optimizer and data order restored from ``ckpt`` (when resuming and it has a
    checkpoint), the log's rows past it dropped."""
    from gateskip.train_state import load_train_state

    start = 0
    found = load_train_state(ckpt) if resume else None
    if found is not None:
        state, _ = found
        _load_router_state(net, state["trainable"])
        opt.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        start = int(state["step"])
    if log_path.exists():  # rows past the checkpoint are re-done: keep only those before it
        kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    return start


def _on_step(net, stream, ckpt: Path, log_path: Path, save_every: int, steps: int):
    """fit_mod's per-step callback: a log row each step, a checkpoint every ``save_every`` steps and at the last."""
    from gateskip.train_state import save_train_state

    def on_step(step, opt, row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if step % save_every == 0 or step == steps:
            routers = {f"{n}.{k}": v.detach().clone() for n, g in gate_modules(net).items()
                       for k, v in g.state_dict().items()}
            save_train_state(ckpt, {"trainable": routers, "optimizer": opt.state_dict(), "data": stream.state_dict(),
                                    "step": step}, step)

    return on_step


def _load_router_state(net, flat: dict) -> None:
    for name, g in gate_modules(net).items():
        g.load_state_dict({k: flat[f"{name}.{k}"] for k in g.state_dict()})


# ---- the eval sweep's rows ---------------------------------------------------------------------
