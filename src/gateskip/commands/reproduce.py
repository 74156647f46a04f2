"""``gateskip reproduce``: run the ablation grid (train + eval sweep per cell, resumable) and write the table.

Folder layout under ``--out`` (every name carries a hash of the settings that produced it, so a
changed budget never mixes with old results and nothing is ever overwritten):
``<cell>/train-<hash>/`` the gates folder (``gateskip train --out``), ``trained.json`` once done;
``<cell>/eval-<hash>/`` the sweep (``gateskip eval --out``) with ``results.json`` once done.
Baselines: ``mod`` trains routers with ``gateskip train-mod`` (its sweep also gives ``mod_topk``);
``early_exit`` runs on the base cell's model (``vector/train-<hash>``), matched to its compute.
A cell whose ``results.json`` exists for its current settings is never run again; an interrupted
training resumes from its checkpoint (``train(resume=True)``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import shutil
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

from gateskip.errors import GateSkipError
from gateskip.options import as_list
from gateskip.reproduce.grid import BASE, BY_NAME, CELLS, PAPER_PINS, TARGETS, Cell

MARGIN = 0.02  # aim each ratio slightly past its target so that the target lies inside the measured curve
BASELINE_MODULES = {"mod": "mod", "mod_topk": "mod", "early_exit": "earlyexit"}
MOD_METHODS = ("mod", "mod_topk")
CTX = 64  # typical context length of a log-likelihood request, for the FLOP estimate that picks ratios


def reproduce(out: str = "runs/reproduce", cells: list[str] = ("all",), model: str = "smollm2-135m", data: str = "mix",
              steps: int = 30, seq_len: int = 128, batch_size: int = 4, lr: float = 1e-2, backbone_lr: float = 1e-4,
              lam: float = 1.0, tasks: list[str] = ("hellaswag", "piqa"), limit: int = 50, policy: str = "quantile",
              threads: int = 1, seed: int = 0, run: bool = True, doc: str | None = None,
              date: str | None = None) -> Path:
    """Run the paper's ablation grid (one small training run + one eval sweep per cell) and write reproduction.md.

    Args:
        out: output folder (one sub-folder per cell, reproduction.md, reproduction.png).
        cells: cells to run, in order, or ``all``: vector, scalar, before, attn_only,
            mlp_only, l1, kl, frozen, lowrank, mlp_gate, shared, lora, distill, mod (with mod_topk),
            early_exit. Baseline cells run only when their module exists (else marked not available).
        model: base model (alias, local folder or hub id).
        data: training text (see ``gateskip train --data``).
        steps: training steps per cell.
        seq_len: tokens per training row.
        batch_size: training rows per step.
        lr: learning rate of the gates.
        backbone_lr: learning rate of LoRA / full backbone weights.
        lam: weight of the sparsity penalty (the authors' scripts: 1.0).
        tasks: log-likelihood tasks of the eval sweep.
        limit: items per task.
        policy: GateSkip's token choice at evaluation: quantile (paper) or threshold.
        threads: torch CPU threads (0: leave as is).
        seed: seed of training data order, gate init and random choices.
        run: run the missing cells; --no-run only writes the report from finished cells.
        doc: also copy reproduction.md (and its PNG) to this path, e.g. docs/reproduction.md.
        date: date written into the report (default: today).
    """
    import torch
    from tqdm.auto import tqdm

    chosen = _choose(cells)
    if threads:
        torch.set_num_threads(threads)
    budget = {"model": model, "data": data, "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
              "backbone_lr": backbone_lr, "lam": lam, "seed": seed}
    # the spec names the run folders by hash: tasks stay the comma text earlier runs were hashed with
    spec = {"tasks": ",".join(as_list(tasks, what="task")), "limit": limit, "policy": policy, "seed": seed}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    command = _command_line(locals())
    status: dict[str, str] = {}
    if run:
        for cell in (bar := tqdm(chosen, desc="reproduce", unit="cell")):
            bar.set_postfix_str(cell.name)
            status[cell.name] = _run_cell(root, cell, budget, spec, threads)
            _write(root, budget, spec, status, command, doc, date)  # the table grows as cells finish
    return _write(root, budget, spec, status, command, doc, date)


def _choose(cells) -> list[Cell]:
    names = as_list(cells, str, "--cells")
    names = [c.name for c in CELLS] if names == ["all"] else names
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise GateSkipError(f"unknown cell(s) {', '.join(unknown) or '(none given)'}: choose from "
                            f"{', '.join(BY_NAME)} or all")
    return [BY_NAME[n] for n in names]


def available(cell: Cell) -> str | None:
    """None when the cell can run here; otherwise why not (checked at run time: baselines are optional)."""
    if cell.method == "gateskip":
        return None
    from gateskip.eval import sweep

    module = f"gateskip.baselines.{BASELINE_MODULES[cell.method]}"
    if importlib.util.find_spec(module) is None:
        return f"not available: {module} does not exist yet"
    if cell.method not in sweep.METHODS:
        return f"not available: gateskip eval has no method {cell.method!r}"
    return None


# ---- settings and folders ----------------------------------------------------------------------

def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def train_settings(cell: Cell, budget: dict) -> dict:
    """Training keyword arguments of a cell: ``gateskip.commands.train.train``'s (early exit: the base cell's, as
    it runs on the base cell's model) or ``gateskip.baselines.mod.train_mod``'s (marked ``trainer``)."""
    if cell.method in MOD_METHODS:  # routers on the frozen model, trained on the same text and budget
        keep = ("model", "data", "steps", "seq_len", "batch_size", "seed")
        return {"trainer": "train_mod", **{k: budget[k] for k in keep}, "objective": "ce",
                "warmup": max(1, budget["steps"] // 10)}
    base = cell if cell.method == "gateskip" else BY_NAME["vector"]
    return {**budget, **base.train_switches, "warmup": max(1, budget["steps"] // 10), "max_ratio": 0.2}


def eval_settings(cell: Cell, budget: dict, spec: dict) -> dict:
    tr = train_settings(cell, budget)
    if cell.method in MOD_METHODS:  # one sweep gives both MoD rows; a router costs about a scalar gate
        return {**spec, "methods": ",".join(MOD_METHODS), "modules": "attn,mlp",
                "ratios": ratios_for(budget["model"], {**BASE, "gate": "scalar"}), "train": _key(tr)}
    # early exit is matched to gateskip's measured compute at each ratio, so gateskip runs with it
    methods = "gateskip" if cell.method == "gateskip" else f"gateskip,{cell.method}"
    return {**spec, "methods": methods, "modules": tr["modules"],
            "ratios": ratios_for(budget["model"], tr), "train": _key(tr)}


def cell_dirs(root: Path, cell: Cell, budget: dict, spec: dict) -> tuple[Path, Path]:
    tr = train_settings(cell, budget)
    owner = {"gateskip": cell.name, "early_exit": "vector"}.get(cell.method, "mod")  # early exit: the base model
    ev = root / (cell.source or cell.name) / f"eval-{_key(eval_settings(cell, budget, spec))}"
    return root / owner / f"train-{_key(tr)}", ev


def load_results(eval_dir: Path) -> dict | None:
    """The finished sweep of a cell, or None (missing, or cut short while being written)."""
    try:
        res = json.loads((eval_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return res if isinstance(res, dict) and "methods" in res else None


def ratios_for(model: str, tr: dict, targets=TARGETS) -> str:
    """Skip ratios whose FLOP-weighted compute saved should land just past each target (and ratio 0).

    From the FLOP model (gateskip.flops): saved(r) = (r * skippable - gates) / dense per token, so
    r = (target * dense + gates) / skippable. Gates cost the same at every ratio (they always run).
    """
    from transformers import AutoConfig

    from gateskip.arch import text_config
    from gateskip.config import GateSkipConfig
    from gateskip.flops import model_flops
    from gateskip.models import _resolve

    mods = tuple(tr["modules"].split(","))
    gcfg = GateSkipConfig(gate=tr["gate"], shared=tr["shared"], placement=tr["placement"])
    cfg = AutoConfig.from_pretrained(_resolve(model, None)[0])
    f = model_flops(SimpleNamespace(config=cfg), gcfg)
    n = text_config(SimpleNamespace(config=cfg)).num_hidden_layers
    attn = f.attn_qo + f.attn_ctx * CTX  # kv=compute (train's default): skipped tokens still make their K/V
    dense = n * (f.attn_qo + f.attn_kv + f.attn_ctx * CTX + f.mlp) + f.lm_head
    skippable = n * ((attn if "attn" in mods else 0) + (f.mlp if "mlp" in mods else 0))
    gates = n * 2 * f.gate  # train() gates both kinds; ``modules`` only chooses which kind skips
    ratios = {0.0} | {round(min(0.95, ((t + MARGIN) * dense + gates) / skippable), 3) for t in targets}
    for extra in (0.5, 0.75, 0.25):  # targets out of reach collapse onto 0.95: still measure a curve
        if len(ratios) < len(targets) + 1:
            ratios.add(extra)
    return ",".join(f"{r:g}" for r in sorted(ratios))


# ---- running a cell ------------------------------------------------------------------------------

def _run_cell(root: Path, cell: Cell, budget: dict, spec: dict, threads: int) -> str:
    why = available(cell)
    if why:
        return why
    train_dir, eval_dir = cell_dirs(root, cell, budget, spec)
    if load_results(eval_dir) is not None:
        return "finished earlier (not re-run)"
    try:
        _ensure_trained(train_dir, train_settings(cell, budget))
        ev = eval_settings(cell, budget, spec)
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "eval_settings.json").write_text(json.dumps(ev, indent=2))
        from gateskip.commands.eval import evaluate

        is_mod = cell.method in MOD_METHODS
        evaluate(gates=None if is_mod else str(train_dir), mod=str(train_dir) if is_mod else None,
                 model=budget["model"] if is_mod else None,  # a gates folder names its model; a MoD folder here not
                 tasks=ev["tasks"], ratios=ev["ratios"], policy=ev["policy"], methods=ev["methods"],
                 modules=ev["modules"], limit=ev["limit"], out=str(eval_dir), seed=ev["seed"], threads=threads,
                 calib_batches=1)
        return "finished"
    except GateSkipError as e:  # one broken cell (e.g. a diverging loss) must not stop the grid
        print(f"gateskip reproduce: cell {cell.name} failed: {e}", file=sys.stderr)
        return f"failed: {e}"
    except Exception as e:  # noqa: BLE001 - same reason; the traceback goes to the log
        traceback.print_exc()
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _ensure_trained(train_dir: Path, tr: dict) -> None:
    done = train_dir / "trained.json"
    if done.is_file():
        return
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "train_settings.json").write_text(json.dumps(tr, indent=2))
    every = max(1, tr["steps"] // 3)
    if tr.get("trainer") == "train_mod":
        from gateskip.commands.train_mod import train_mod

        train_mod(out=str(train_dir), calibrate_batches=1, save_every=every, resume=True,
                  **{k: v for k, v in tr.items() if k != "trainer"})
    else:
        from gateskip.commands.train import train

        train(out=str(train_dir), calibrate_batches=1, save_every=every, keep_checkpoints=1, resume=True,
              **{**PAPER_PINS, **tr})
    # The gates folder holds everything the eval needs; full-backbone checkpoints are ~1.5 GB each.
    shutil.rmtree(train_dir / "checkpoint", ignore_errors=True)
    done.write_text(json.dumps(tr, indent=2))


# ---- report --------------------------------------------------------------------------------------

def _command_line(args: dict) -> str:
    flags = ["out", "cells", "model", "data", "steps", "seq_len", "batch_size", "lr", "backbone_lr", "lam", "tasks",
             "limit", "policy", "threads", "seed"]
    shown = {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in args.items()}
    return "gateskip reproduce " + " ".join(f"--{k.replace('_', '-')} {shown[k]}" for k in flags)


def _write(root: Path, budget: dict, spec: dict, status: dict, command: str, doc: str | None, date: str | None) -> Path:
    from gateskip.reproduce.report import write_report

    rows = []
    for cell in CELLS:
        why = available(cell)
        train_dir, eval_dir = cell_dirs(root, cell, budget, spec)
        res = None if why else load_results(eval_dir)
        state = why or ("finished" if res else status.get(cell.name, "not run"))
        if res is None and state.startswith("finished"):
            state = "not run"
        rows.append({"cell": cell, "results": res, "status": state, "train_dir": train_dir})
    meta = {"command": command, "date": date or datetime.date.today().isoformat(), "budget": budget, "spec": spec}
    return write_report(rows, meta, root, doc)
