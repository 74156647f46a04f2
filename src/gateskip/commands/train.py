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
from gateskip.args import CalibrationArgs, RunArgs, StartArgs, TextArgs, TrainArgs
from gateskip.chat import answer_markers, resolve_chat_source
from gateskip.checkpoint import SAVE_DTYPES, save_gates
from gateskip.config import RECOMMENDED, GateSkipConfig, special_token_ids
from gateskip.core import add_gates, calibrate, gate_state
from gateskip.errors import GateSkipError
from gateskip.files import atomic_write
from gateskip.flags import apply, fit_ranks, given_fields, start_config
from gateskip.lora import attach_lora, merge_lora
from gateskip.train import fit


def train(model: str = "smollm2-135m", out: str = "runs/gates", *, text: TextArgs = TextArgs(),
          gates: GateSkipConfig = RECOMMENDED, start: StartArgs = StartArgs(), loop: TrainArgs = TrainArgs(),
          calibration: CalibrationArgs = CalibrationArgs(), run: RunArgs = RunArgs(),
          protect_special: bool = False, **flags) -> Path:
    """Train gates on offline text and write a gates folder.

    The defaults are the best measured recipe on SmolLM2-135M for chat generation (BENCHMARKS.md, "Generation:
    chat fidelity"; ``artifacts/smollm2-chat``; written out in recipes/best.yaml): ``config.RECOMMENDED`` gates
    (MLP branches only, neurons fallbacks), fitted in closed form (``--init fit``, as ``gateskip fit``), then
    trained end to end by self-distillation on a frozen backbone, skipping 60% of the MLP tokens (no sparsity
    penalty: the budget sets the skipping), on text that includes the model's own chat answers
    (``--data mix,chat``). The paper's recipe is one flag away: ``--config paper``.

    Each group's fields are flags (``--steps 200``) and keyword arguments (``steps=200``, or ``loop=TrainArgs(...)``):
    ``text`` (gateskip.args.TextArgs), ``gates`` (gateskip.GateSkipConfig: gate, rank, modules, fallback ...),
    ``start`` (StartArgs: init, fit_ratio, fallback_batches), ``loop`` (TrainArgs), ``calibration``
    (CalibrationArgs) and ``run`` (RunArgs). With ``--init DIR`` the folder's gates are kept, and the gate flags
    given replace its settings (a different fallback is fitted again; ``modules``: the kinds that skip).

    Args:
        model: base model: ``smollm2-135m`` (embedded), a local HF folder or a hub id.
        out: output folder (gates.safetensors, gateskip.json, train_log.jsonl, checkpoint/).
        protect_special: never skip the tokenizer's special tokens (chat markers, BOS, EOS), recorded in the gates
            folder as their ids.
    """
    groups = apply(flags, {"text": text, "gates": gates, "start": start, "loop": loop, "calibration": calibration,
                           "run": run}, "gateskip train")
    text, start, loop, calibration, run = (groups[k] for k in ("text", "start", "loop", "calibration", "run"))
    cfg, skip_modules, given = start_config(groups["gates"], start, given_fields(flags, gates, RECOMMENDED))
    _check_combination(cfg, start, loop, run)
    d = gdist.init_from_env()
    if run.fsdp and not d.enabled:
        raise GateSkipError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
    out_dir = Path(out)
    try:
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        _seed_all(loop.seed)
        net, tok, data = _load(model, text, run, d)
        if protect_special:
            cfg = dataclasses.replace(cfg, protect_tokens=special_token_ids(tok))
        cfg = fit_ranks(cfg, net, given)
        _start_gates(net, tok, cfg, start, text, data, out_dir, loop.resume, d.is_main)
        net.to(d.device if d.enabled else _device(run.device))
        from gateskip.data import load_texts, pack

        # Every rank reads the same global batches (world x batch_size rows) and keeps its own slice.
        stream = pack(tok, load_texts(data, split="train", limit=text.limit_texts), seq_len=text.seq_len,
                      batch_size=text.batch_size * d.world, seed=loop.seed)
        markers = answer_markers(tok) if loop.loss_on == "answers" else None
        peft_model = fit(net, stream, loop, out=out_dir, modules=skip_modules, fitted=start.fitted, dist=d,
                         fsdp=run.fsdp, answer_markers=markers)
        if run.fsdp:  # gather the sharded weights (a collective); rank 0 calibrates an unsharded copy
            net, peft_model = _gathered(net, model, run, cfg, loop, d)
        if not d.is_main:  # rank 0 alone calibrates and writes the gates folder
            gdist.barrier(d)
            return out_dir
        meta = {"quant": run.quant, "data": text.data, "steps": loop.steps, "seq_len": text.seq_len,
                "batch_size": text.batch_size, "world_size": d.world, "grad_accum": loop.grad_accum, "lr": loop.lr,
                "objective": loop.objective, "loss_on": loop.loss_on, "sparsity": loop.sparsity_kind, "lam": loop.lam,
                "max_ratio": loop.max_ratio, "min_ratio": loop.min_ratio, "ramp_steps": loop.ramp(start.fitted),
                "seed": loop.seed, "straight_through": loop.straight_through, "init": start.init,
                "budget": loop.budget, "train_fallback": loop.train_fallback, "modules": list(skip_modules)}
        _finish(net, tok, peft_model, out_dir, data=data, backbone=loop.backbone, modules=skip_modules,
                calibrate_ratio=loop.budget_ratios() or calibration.calibrate_ratio,
                calibrate_batches=calibration.calibrate_batches, seq_len=text.seq_len, batch_size=text.batch_size,
                save_dtype=run.save_dtype, meta_training=meta)
        gdist.barrier(d)
        return out_dir
    finally:
        gdist.shutdown(d)


def _check_combination(cfg: GateSkipConfig, start: StartArgs, loop: TrainArgs, run: RunArgs) -> None:
    """The checks that need more than one group (each group checks its own values)."""
    if loop.straight_through and cfg.placement != "after":
        raise GateSkipError("--straight-through needs gates after the branch (placement=after): a gate before it "
                            "changes the branch input, so a skipped token has no output to pass the gradient through")
    if run.quant != "none" and loop.backbone != "frozen":
        raise GateSkipError(f"--quant {run.quant} trains gates on a frozen quantized backbone: use --backbone frozen "
                            "(LoRA / full fine-tuning of rounded weights is not supported)")
    if start.init == "fit" and not cfg.has_fallback:
        raise GateSkipError("--init fit fits fallbacks and gates in closed form: pass --fallback lowrank (or mean, "
                            "linear), or --init none for new gates with zero fallbacks")
    if start.init == "fit" and (cfg.gate == "mlp" or cfg.placement != "after" or cfg.shared):
        raise GateSkipError(f"--init fit writes a fitted cost predictor into one gate per branch placed after it: "
                            f"gate={cfg.gate!r}, placement={cfg.placement!r}, shared={cfg.shared} cannot hold it; "
                            "pass --gate lowrank/vector/scalar --placement after --no-shared, or --init none")
    if start.folder is not None and run.fsdp:
        raise GateSkipError("--init DIR with --fsdp is not supported: start from new gates (--init fit or none), or "
                            "train without --fsdp")


def _load(model: str, text: TextArgs, run: RunArgs, d) -> tuple:
    """The backbone (quantized for ``--quant``), its tokenizer and the training text's source."""
    from gateskip.loading import quantize_for_run
    from gateskip.models import load_model

    net, tok = load_model(model, dtype=run.dtype)
    data = resolve_chat_source(text.data, net, tok, model, n=text.chat_texts, log=(
        lambda line: print(f"[gateskip train] {line}", flush=True)) if d.is_main else None)
    quantize_for_run(net, run.quant)  # no-op for none; gates stay float32 either way
    return net, tok, data


def _start_gates(net, tok, cfg: GateSkipConfig, start: StartArgs, text: TextArgs, data, out_dir: Path,
                 resume: bool, main: bool) -> None:
    """Gates fitted in closed form (init fit), loaded from a folder (its fallbacks fitted again when ``cfg``
    asks for others), or new (init none)."""
    if start.init == "fit":
        _fitted_start(net, tok, cfg, out_dir / "fit", data=data, limit_texts=text.limit_texts, seq_len=text.seq_len,
                      batch_size=text.batch_size, batches=start.fallback_batches, ratio=start.fit_ratio,
                      resume=resume, main=main)
        return
    if start.folder is None:
        add_gates(net, cfg)
        return
    from gateskip.checkpoint import load_gates

    load_gates(net, start.folder)
    st = gate_state(net)
    if st.cfg.fallback_spec() != cfg.fallback_spec() and cfg.has_fallback:
        from gateskip.data import fixed_batches, load_texts
        from gateskip.fallback_fit import fit_fallback

        batches = fixed_batches(tok, load_texts(data, split="train", limit=text.limit_texts), text.seq_len,
                                text.batch_size, start.fallback_batches)
        fb = fit_fallback(net, batches, kind=cfg.fallback, rank=cfg.fallback_rank, mlp_kind=cfg.fallback_mlp,
                          neurons=cfg.fallback_neurons, mlp_rank=cfg.fallback_rank_mlp)
        if main:
            print(f"[gateskip train] fitted {gate_state(net).cfg.fallback_name()} fallbacks on {fb['tokens']} "
                  "tokens", flush=True)


def _gathered(net, model: str, run: RunArgs, cfg: GateSkipConfig, loop: TrainArgs, d) -> tuple:
    """FSDP: the sharded weights gathered (every rank takes part); rank 0 gets an unsharded copy."""
    from gateskip.models import load_model

    full = gdist.full_state(net)
    if not d.is_main:
        return net, None
    net, _ = load_model(model, dtype=run.dtype)
    add_gates(net, cfg)
    peft_model = attach_lora(net, loop.lora_rank) if loop.backbone == "lora" else None
    net.load_state_dict(full)
    net.eval()
    return net, peft_model


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
