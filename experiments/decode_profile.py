"""Where a decode step at batch 1 goes: step time per setting, and matmul time per weight shape.

    python experiments/decode_profile.py --gate lowrank --settings dense,r0,r0.5,r1 --rounds 6 --profile

Settings: ``dense`` (gates removed) and ``rX`` (gated, threshold policy at ratio X, kv=copy, physical
path). Each round times every setting once (interleaved), 40 cached decode steps after a 32-token
prompt, CPU clock, 1 thread; medians over rounds. ``--profile`` adds a torch.profiler table of
``aten::mm`` by input shape for dense and for the second setting (BENCHMARKS.md, Run 5). Random
gates as in ``gateskip bench --random-gates``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gateskip import bench
from gateskip.compat import model_cache_arg
from gateskip.core import gate_state, is_gated, skipping, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gate", default="lowrank")
    ap.add_argument("--settings", default="dense,r0,r0.5,r1")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m, _ = bench._load("smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    rand_ids = lambda b, t: torch.randint(10, 40000, (b, t), generator=gen)  # noqa: E731
    variant = bench._variants(m, None, [a.gate], 16, 0, rand_ids, 256, "threshold")[a.gate]
    prompt = rand_ids(1, 32)
    cache_arg = model_cache_arg(m)

    @torch.no_grad()
    def decode() -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=m.config)
        out = m(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        if is_gated(m) and gate_state(m).plan is not None:
            gate_state(m).reset_stats()  # statistics of the decode steps only
        t0 = time.process_time()
        for i in range(a.steps):
            out = m(input_ids=nxt, attention_mask=torch.ones(1, 33 + i, dtype=torch.long), use_cache=True,
                    logits_to_keep=1, position_ids=torch.tensor([[32 + i]]), **{cache_arg: cache})
            nxt = out.logits[:, -1:].argmax(-1)
        return (time.process_time() - t0) / a.steps * 1e3

    def run(name: str) -> float:
        if name == "dense":
            bench._install(m, None)
            return decode()
        bench._install(m, variant)
        with skipping(m, ratio=float(name[1:]), policy="threshold", kv="copy"):
            ms = decode()
            st = stats(m)
            skipped[name] = (st["tokens_skipped"], st["compute_saved"])
        return ms

    names = a.settings.split(",")
    skipped = {}
    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            times[n].append(run(n))
    dense = statistics.median(times[names[0]])
    for n, xs in times.items():
        med = statistics.median(xs)
        print(f"{n:8s} {med:7.2f} ms/token  {dense / med:5.3f}x {names[0]}  tokens skipped {skipped.get(n, (0, 0))[0]:.3f}"
              f"  compute saved {skipped.get(n, (0, 0))[1]:.3f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for n in names[:2]:
            run(n)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                ms = run(n)
            print(f"== {n}: {ms:.2f} ms/token; aten::mm by shape (prompt included)")
            rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
            for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:8]:
                print(f"  {str(e.input_shapes):44s} calls {e.count:5d}  total {e.self_cpu_time_total / 1e3:7.1f} ms"
                      f"  mean {e.self_cpu_time_total / e.count:7.1f} us")


if __name__ == "__main__":
    main()
