"""The main job (``make demo``): train gates on SmolLM2, then show what skipping does and costs.

1. Train gates on offline text (never on evaluation items; resumes if ``out/gates`` has a checkpoint).
2. Generate from a few instructions with the dense model and with skipping, printing the tokens
   skipped (the paper's measure) and the FLOP-weighted compute saved (gates counted).
3. When the evaluation extra is installed: a skip-ratio sweep on real benchmarks against the
   baselines, written to ``out/{report.md,curve.png,results.json}``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from gateskip.errors import GateSkipError


def demo(out: str = "runs/demo", model: str = "smollm2-135m", steps: int = 40, gate: str = "lowrank",
         ratio: float = 0.3, prompts: int = 2, max_new_tokens: int = 40, evaluate: bool = True,
         tasks: str = "hellaswag,piqa,arc_easy,winogrande,boolq", limit: int = 60,
         ratios: str = "0,0.25,0.5", methods: str = "gateskip,random,shortgpt", threads: int = 2) -> None:
    """Run the main job on the embedded default model: train, generate with skipping, evaluate.

    Args:
        out: output folder (gates/, report.md, curve.png, results.json).
        model: base model (the embedded smollm2-135m by default).
        steps: gate training steps (a short run; see BENCHMARKS.md for longer ones).
        gate: gate kind: lowrank (cheap: ~1% FLOPs on SmolLM2), vector (the paper's), scalar.
        ratio: skip ratio of the generation examples.
        prompts: number of example instructions to generate from.
        max_new_tokens: tokens generated per example.
        evaluate: run the benchmark sweep (needs the eval extra: lm-eval).
        tasks: benchmark tasks of the sweep, comma-separated.
        limit: items per task in the sweep.
        ratios: skip ratios of the sweep, comma-separated.
        methods: methods of the sweep besides dense (see ``gateskip eval --help``); the default keeps
            the demo near half an hour on a 2-core CPU: GateSkip, random skipping at the same ratio,
            and ShortGPT layer pruning at matched compute.
        threads: torch CPU threads.
    """
    from gateskip.checkpoint import load_gates
    from gateskip.core import remove_gates
    from gateskip.data import sample_prompts
    from gateskip.generate import complete, summary_line
    from gateskip.models import load_model
    from gateskip.policies import check_ratio
    from gateskip.train import train

    check_ratio(ratio)
    torch.set_num_threads(threads)
    out_dir = Path(out)
    gates_dir = out_dir / "gates"
    t0 = time.perf_counter()
    _say(f"1/3 training {gate} gates on {model} for {steps} steps -> {gates_dir}")
    train(model=model, out=str(gates_dir), steps=steps, gate=gate)
    _say(f"    trained in {time.perf_counter() - t0:.0f}s")

    _say(f"2/3 generating with and without skipping (threshold policy, ratio {ratio})")
    net, tok = load_model(model)
    load_gates(net, gates_dir)
    for prompt in sample_prompts()[:prompts]:
        print(f"\n### {prompt}")
        for r in (0.0, ratio):
            text, s, seconds, n = complete(net, tok, prompt, skip=r, max_new_tokens=max_new_tokens)
            print(f"--- skip {r:g}: {summary_line(s, 'threshold', r)}, {n / seconds:.1f} tokens/s")
            print(text.strip())
    remove_gates(net)
    del net

    if not evaluate:
        return
    if importlib.util.find_spec("lm_eval") is None:
        _say("3/3 skipped: the benchmark sweep needs lm-eval (pip install 'gateskip[eval]')")
        return
    try:
        from gateskip.eval import evaluate as run_eval
    except ImportError as e:
        raise GateSkipError(f"the evaluation module is unavailable ({e}): reinstall gateskip") from None
    _say(f"3/3 benchmark sweep: {methods} on {tasks} (limit {limit}) at ratios {ratios} -> {out_dir}")
    run_eval(gates=str(gates_dir), tasks=tasks, ratios=ratios, limit=limit, out=str(out_dir), threads=threads,
             methods=methods)
    _say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: see {out_dir / 'report.md'} and {out_dir / 'curve.png'}")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)
