"""``gateskip train``: gates (and fallbacks, LoRA) trained on offline text, written as a gates folder.

The command: flags checked, model loaded (quantized for ``--quant``), gates built or fitted in closed
form (``--init fit``) or loaded (``--init DIR``), the library loop (``gateskip.train.fit``) run, LoRA
merged, thresholds calibrated on held-out text and the folder saved. The training step itself, its
losses and its checkpoints live in the library (train.py, losses.py, train_state.py).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from gateskip import distributed as gdist
from gateskip.allocate import read_budget
from gateskip.chat import CHAT_TEXTS, resolve_chat_source
from gateskip.checkpoint import SAVE_DTYPES, atomic_write, save_gates
from gateskip.config import GateSkipConfig, special_token_ids
from gateskip.core import add_gates, calibrate, gate_state
from gateskip.errors import GateSkipError
from gateskip.lora import attach_lora, merge_lora
from gateskip.losses import check_sparsity_kind
from gateskip.options import as_list
from gateskip.policies import check_ratio
from gateskip.train import BACKBONES, OBJECTIVES, _check_ladder, fit

NEURONS_RANK = 128  # the default neurons fallback's rank (BENCHMARKS.md, "A nonlinear MLP fallback")


def train(model: str = "smollm2-135m", out: str = "runs/gates", data: str = "mix,chat", steps: int = 150,
          seq_len: int = 256, batch_size: int = 4, grad_accum: int = 1, lr: float = 1e-3,
          backbone: str = "frozen", backbone_lr: float = 1e-3, lora_rank: int = 8,
          objective: str = "distill", sparsity_kind: str = "l2", lam: float = 0.0, kl_target: float = 0.5,
          max_ratio: float = 0.6, min_ratio: float | None = None, ramp_steps: int | None = None,
          modules: list[str] | None = None, warmup: int = 20, gate: str = "lowrank", rank: int = 16, init_bias: float = 5.0, init_std: float = 0.01, kv: str = "compute",
          placement: str = "after", shared: bool = False,
          calibrate_ratio: float = 0.5, calibrate_batches: int = 8, save_every: int = 50, seed: int = 0,
          dtype: str = "float32", resume: bool = True, limit_texts: int | None = None, fsdp: bool = False,
          keep_checkpoints: int = 2, device: str = "auto", protect_first: int = 1, quant: str = "none",
          straight_through: bool = False, init: str | None = "fit", budget: str | None = None,
          fallback: str | None = None, fallback_rank: int = 64, fallback_batches: int = 8, train_fallback: bool = True,
          fallback_lr: float = 1e-4, fit_ratio: float = 0.45, save_dtype: str = "float32",
          fallback_mlp: str | None = None, fallback_neurons: int = 64, fallback_rank_mlp: int | None = None,
          protect_last: bool = True, protect_special: bool = False, chat_texts: int = CHAT_TEXTS) -> Path:
    """Train gates on offline text and write a gates folder.

    The defaults are the best measured recipe on SmolLM2-135M for chat generation (BENCHMARKS.md, "Generation:
    chat fidelity"; ``artifacts/smollm2-chat``): gates on the MLP branches only, each with a neurons fallback (64 of
    its own neurons and a rank-128 map), fitted in closed form (``init="fit"``, as ``gateskip fit``), then trained
    end to end by self-distillation on a frozen backbone, skipping 60% of the MLP tokens (no sparsity penalty: the
    budget sets the skipping), on text that includes the model's own chat answers (``--data mix,chat``); each
    prompt's last position never skips. ``--backbone lora --steps 300 --data mix`` is the recipe of
    ``artifacts/smollm2-mlp`` (best on the core suite, but its answers to chat requests stop early).
    ``--modules attn,mlp --fallback lowrank --max-ratio 0.4 --fit-ratio 0.3 --calibrate-ratio 0.3`` is the
    earlier best (both kinds, low-rank fallbacks: ``artifacts/smollm2-healed``). The paper's recipe is one flag
    away: ``--config paper`` (vector gates, zero for skipped tokens, cross-entropy + 0.1 L2 sparsity, ratio ramped
    to 0.2, full fine-tuning).

    Args:
        model: base model: ``smollm2-135m`` (embedded), a local HF folder or a hub id.
        out: output folder (gates.safetensors, gateskip.json, train_log.jsonl, checkpoint/).
        data: training text: boolq, lambada, shakespeare, mix, qa, chat (the model's own greedy answers to chat
            requests, in its chat template: self-distillation text, written once into the gateskip cache), several
            joined by commas (interleaved, e.g. mix,chat), a .txt/.jsonl file, or a dataset.
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
        modules: branch kinds that get gates and skip (attn, mlp or attn,mlp); default: mlp for new gates (the
            best recipe), the folder's gated kinds with --init DIR (given: a subset of them).
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
        protect_last: never skip the last position of a prompt (its logits choose the first generated token;
            skipping it turns chat answers into an immediate end of turn), recorded in the gates folder.
        chat_texts: with --data chat: how many self-distillation answers to write (once per model and number).
        protect_special: never skip the tokenizer's special tokens (chat markers, BOS, EOS), recorded in the gates
            folder as their ids.
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
        fallback: what a skipped token gets: zero (paper), mean, lowrank, linear or neurons (MLP only), fitted in
            closed form (gateskip.fit_fallback) on the training text before training; default for new gates:
            lowrank, and neurons for the MLPs with ``fallback_rank_mlp`` 128 unless given (with --fallback given,
            every branch gets it unless --fallback-mlp says otherwise); the folder's own with --init DIR (given,
            it replaces the folder's unless the same).
        fallback_rank: inner size of a lowrank fallback.
        fallback_mlp: the MLP branches' fallback when it differs from ``fallback`` (new or refitted fallbacks
            only), e.g. lowrank for attention and linear or neurons for the MLPs.
        fallback_neurons: how many of each MLP's neurons a neurons fallback computes.
        fallback_rank_mlp: the MLP fallbacks' rank when it differs from ``fallback_rank`` (default: the same).
        fallback_batches: batches of batch_size x seq_len training tokens the fallback (and with init=fit, the
            gates) are fitted on.
        train_fallback: train the fallbacks end to end with the gates (learning rate ``fallback_lr``; nothing to
            train with fallback zero).
        fallback_lr: learning rate of the fallbacks.
        fit_ratio: init=fit: the skip ratio (every skipping branch, quantile) the closed-form fit is refitted under.
        save_dtype: how the gates folder stores gates, fallbacks, LoRA deltas and a full backbone: float32, float16 or bfloat16
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
    init = None if init in (None, "", "none") else init
    if fallback is None:
        fallback = "lowrank" if init is None or init == "fit" else "keep"
        if fallback == "lowrank" and fallback_mlp is None:  # the best measured MLP fallback
            fallback_mlp = "neurons"
    auto_rank = fallback_mlp == "neurons" and fallback_rank_mlp is None and fallback != "neurons"
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
    gated = ["mlp"]  # new gates: the best recipe's
    if init not in (None, "fit"):
        from gateskip.checkpoint import read_meta

        gated = read_meta(init)["config"].get("modules", ["attn", "mlp"])
    skip_modules = tuple(gated) if modules is None else tuple(as_list(modules, str, "--modules"))
    if set(skip_modules) - set(gated) and init not in (None, "fit"):
        raise GateSkipError(f"--modules {','.join(skip_modules)}: the folder {init!r} has gates on "
                            f"{','.join(gated)} only; pass --modules {','.join(gated)} (or a subset)")
    # fitted gates need only a short ramp; new gates the paper's long one
    ramp_steps = ramp_steps if ramp_steps is not None else max(1, int((0.8 if init is None else 0.1) * steps))
    if init not in (None, "fit") and fsdp:
        raise GateSkipError("--init DIR with --fsdp is not supported: start from new gates (--init fit or none), or "
                            "train without --fsdp")
    budget_ratios = read_budget(budget) if budget else None  # allocate.py
    gate_cfg = GateSkipConfig(gate=gate, rank=rank, init_bias=init_bias, init_std=init_std, kv=kv, modules=skip_modules,
                              placement=placement, shared=shared, protect_first=protect_first,
                              protect_last=protect_last,
                              fallback="zero" if fallback == "keep" else fallback, fallback_rank=fallback_rank,
                              fallback_mlp=None if fallback == "keep" else fallback_mlp,
                              fallback_neurons=fallback_neurons, fallback_rank_mlp=fallback_rank_mlp)
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
        data_name, data = data, resolve_chat_source(data, net, tok, model, n=chat_texts, log=(
            lambda line: print(f"[gateskip train] {line}", flush=True)) if d.is_main else None)
        if protect_special:
            gate_cfg = dataclasses.replace(gate_cfg, protect_tokens=special_token_ids(tok))
        if auto_rank:  # a neurons fallback of unset rank: NEURONS_RANK, or the hidden size if smaller
            from gateskip.arch import text_config

            gate_cfg = dataclasses.replace(gate_cfg, fallback_rank_mlp=min(NEURONS_RANK, text_config(net).hidden_size))
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
                init is None or st.cfg.fallback_spec() != gate_cfg.fallback_spec()):
            from gateskip.data import fixed_batches
            from gateskip.fallback_fit import fit_fallback

            fb = fit_fallback(net, fixed_batches(tok, load_texts(data, split="train", limit=limit_texts), seq_len,
                                                 batch_size, fallback_batches), kind=fallback, rank=fallback_rank,
                              mlp_kind=fallback_mlp, neurons=fallback_neurons, mlp_rank=fallback_rank_mlp)
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
        _finish(net, tok, peft_model, out_dir, data=data, backbone=backbone, modules=skip_modules,
                calibrate_ratio=budget_ratios if budget_ratios else calibrate_ratio,
                calibrate_batches=calibrate_batches, seq_len=seq_len, batch_size=batch_size, save_dtype=save_dtype,
                meta_training={"quant": quant, "data": data_name, "steps": steps, "seq_len": seq_len, "batch_size": batch_size,
                               "world_size": d.world, "grad_accum": grad_accum, "lr": lr, "objective": objective,
                               "sparsity": sparsity_kind, "lam": lam, "max_ratio": max_ratio,
                               "min_ratio": min_ratio, "ramp_steps": ramp_steps, "seed": seed, "straight_through": straight_through,
                               "init": init, "budget": budget, "train_fallback": train_fallback,
                               "modules": list(skip_modules)})
        gdist.barrier(d)
        return out_dir
    finally:
        gdist.shutdown(d)


def _fitted_start(net, tok, cfg: GateSkipConfig, folder: Path, *, data, limit_texts, seq_len, batch_size, batches,
                  ratio, resume, main) -> None:
    """``init="fit"``: gates and fallbacks fitted in closed form (``gatefit.fit_closed_form``), saved in ``folder``;
    a resumed run loads that folder instead of fitting again. New gates are on the kinds that skip in training
    (``cfg.modules``), so the refit and the calibration skip every gated branch, as training will."""
    from gateskip.checkpoint import load_gates

    if resume and (folder / "gateskip.json").is_file():
        load_gates(net, folder)
        return
    from gateskip.data import fixed_batches, load_texts
    from gateskip.gatefit import fit_closed_form

    add_gates(net, cfg)
    cal = fixed_batches(tok, load_texts(data, split="train", limit=limit_texts), seq_len, batch_size, batches)
    fit_closed_form(net, cal, fallback=cfg.fallback, fallback_rank=cfg.fallback_rank, fallback_mlp=cfg.fallback_mlp,
                    fallback_neurons=cfg.fallback_neurons, fallback_rank_mlp=cfg.fallback_rank_mlp,
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
            batch_size, meta_training, save_dtype: str = "float32", modules=("attn", "mlp")) -> None:
    """Merge LoRA, calibrate thresholds on held-out text and write the gates folder."""
    from gateskip.data import fixed_batches, load_texts

    extra = merge_lora(net, peft_model) if peft_model is not None else {}
    heldout = load_texts(data, split="heldout", limit=None)
    cal = calibrate(net, fixed_batches(tok, heldout, seq_len, batch_size, calibrate_batches), ratio=calibrate_ratio,
                    modules=modules)
    meta = {"backbone": backbone, "training": {**meta_training, "calibration": cal}}
    save_gates(net, out_dir, extra_tensors=extra, extra_meta=meta, dtype=save_dtype)
    if backbone == "full":  # every backbone weight, stored like the gates (--save-dtype float16: half the size)
        from safetensors.torch import save_file
        store = SAVE_DTYPES[save_dtype] or torch.float32
        changed = {k: v.detach().to(store).cpu().clone() for k, v in net.named_parameters() if ".gate." not in k}
        atomic_write(out_dir / "backbone.safetensors", lambda p: save_file(changed, p))



def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
