"""Pick a 4-bit weight-only quantization library by measurement (SmolLM2-135M, CPU, 1 thread).

For each candidate the decoder layers' linear layers are quantized to 4 bits (group size 64; lm_head,
embeddings and norms stay float32) and we measure: does it run, serialized size of the decoder layers,
prefill latency (1 x 256 tokens), one decode step (batch 1, 256 cached tokens), and the mean token NLL /
perplexity on held-out ``mix`` text. Latencies are CPU time of the process (1 thread) against the float32 model.

Each library runs in its own process: candidates are installed side by side with ``pip install --target``
into /tmp/qlibs/<name> so none of them touches the project venv (torchao or quanto being importable
changes what transformers / peft do). Run:

    .venv/bin/python experiments/quant_pick.py --out runs/quant_pick.json     # all candidates
    PYTHONPATH=/tmp/qlibs/quanto .venv/bin/python experiments/quant_pick.py --lib quanto   # one, JSON line
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

GROUP = 64  # SmolLM2's hidden size 576 is not a multiple of 128, quanto's default group
CANDIDATES = ("fp32", "quanto", "quanto_g32", "quanto_hqq", "hqq", "torchao")


def decoder_linears(model):
    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


def quantize_with(lib: str, model) -> str:
    """Quantize the decoder layers' linears in place; returns a note on the storage format."""
    layers = model.model.layers
    if lib == "fp32":
        return "float32"
    if lib.startswith("quanto"):
        from optimum.quanto import HqqOptimizer, freeze, qint4, quantize

        # quanto's default scale/shift is min-max rounding; quanto_hqq: the same format, HQQ-optimised
        quantize(layers, weights=qint4, optimizer=HqqOptimizer() if lib == "quanto_hqq" else None)
        for m in layers.modules():  # default group size (128) would not divide 576: set it per module
            if hasattr(m, "weight_qtype"):
                m.weight_group_size = 32 if lib == "quanto_g32" else GROUP
        freeze(layers)
        how = "HQQ-optimised" if lib == "quanto_hqq" else "min-max" + (", group 32" if lib == "quanto_g32" else "")
        return f"WeightQBitsTensor (uint4 packed 2/byte, fp32 scale+shift per group, {how})"
    if lib == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=4, group_size=GROUP)
        for name, lin in decoder_linears(model):
            parent = layers.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu"))
        return "HQQLinear (4-bit packed, HQQ-optimised zero/scale), dequantize + matmul"
    if lib == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        try:  # the real 4-bit packed formats first
            probe = torch.nn.Sequential(torch.nn.Linear(GROUP * 2, 64))
            quantize_(probe, Int4WeightOnlyConfig(group_size=GROUP))
            probe(torch.randn(1, GROUP * 2))
            quantize_(layers, Int4WeightOnlyConfig(group_size=GROUP))
            return "Int4WeightOnlyConfig (packed int4)"
        except Exception as e:  # noqa: BLE001 - recorded in the note: this is the finding
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        quantize_(layers, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)))
        return f"IntxWeightOnlyConfig(int4) = int4 values stored one per int8 byte (packed int4 failed: {why})"
    raise SystemExit(f"unknown library {lib}")


def nbytes(module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def median_ms(fn, n: int) -> float:
    """Median CPU time of this process (1 thread): on a machine shared with other jobs it tracks what an
    idle core would take, where wall time mostly measures the neighbours."""
    fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1000)
    return round(statistics.median(times), 1)


@torch.no_grad()
def measure(lib: str, n_batches: int) -> dict:
    import gateskip
    from gateskip.data import fixed_batches, load_texts

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = gateskip.load_model("smollm2-135m")
    batches = fixed_batches(tok, load_texts("mix", split="heldout"), 256, 4, n_batches)
    fp_bytes = nbytes(model.model.layers)
    ref_logits = model(batches[0][:1]).logits if lib != "fp32" else None
    t = time.perf_counter()
    try:
        note = quantize_with(lib, model)
        logits = model(batches[0][:1]).logits
    except Exception as e:  # noqa: BLE001 - a failing candidate is a result, not a crash
        return {"lib": lib, "works": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    q_seconds = round(time.perf_counter() - t, 1)
    out = {"lib": lib, "works": True, "format": note, "quantize_s": q_seconds,
           "layers_bytes": nbytes(model.model.layers), "layers_bytes_fp32": fp_bytes}
    if ref_logits is not None:
        out["logits_rel_err"] = round(((logits - ref_logits).norm() / ref_logits.norm()).item(), 4)
    x = batches[0][:1]
    out["prefill_ms"] = median_ms(lambda: model(x), 5)
    pre = model(x[:, :-1], use_cache=True)
    cache = pre.past_key_values

    def step():
        model(x[:, -1:], past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to 255 cached tokens: every step sees the same context length

    out["decode_ms"] = median_ms(step, 20)
    nll, n = 0.0, 0
    for b in batches:
        lg = model(b).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += b[:, 1:].numel()
    out["nll"] = round(nll / n, 4)
    out["ppl"] = round(math.exp(nll / n), 2)
    out["tokens"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=CANDIDATES)
    ap.add_argument("--batches", type=int, default=4, help="held-out batches of 4 x 256 tokens")
    ap.add_argument("--libs-dir", default="/tmp/qlibs", help="pip --target folders, one per library")
    ap.add_argument("--out", default="runs/quant_pick.json")
    a = ap.parse_args()
    if a.lib:
        print(json.dumps(measure(a.lib, a.batches)))
        return
    rows = []
    for lib in CANDIDATES:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        path = os.path.join(a.libs_dir, lib)
        if os.path.isdir(path):
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.run([sys.executable, __file__, "--lib", lib, "--batches", str(a.batches)], env=env,
                           capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"lib": lib, "works": False, "error": p.stderr.strip()[-300:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    fp = next(r for r in rows if r["lib"] == "fp32")
    print("| library | works | decoder layers MB | prefill 1x256 ms | decode step ms | NLL | ppl | dNLL vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r.get("works"):
            print(f"| {r['lib']} | no: {r.get('error', '')[:80]} | | | | | | |")
            continue
        print(f"| {r['lib']} | yes | {r['layers_bytes'] / 1e6:.1f} | {r['prefill_ms']} | {r['decode_ms']} | "
              f"{r['nll']} | {r['ppl']} | {r['nll'] - fp['nll']:+.4f} |")


if __name__ == "__main__":
    main()
