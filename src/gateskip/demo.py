"""The main job (``make demo``): make gates for SmolLM2, then show what skipping does and costs.

1. Fit fallbacks and gates in closed form (recipe ``fit``, the default) or train the paper's gates
   (recipe ``paper``), on offline text, never on evaluation items.
2. Generate from a few instructions with the dense model and with skipping, printing the tokens
   skipped (the paper's measure) and the FLOP-weighted compute saved (gates and fallbacks counted).
3. Compare at matched compute: held-out CE against random skipping with the same fallback, the
   oracle, ShortGPT and ShortGPT with linear replacement (``fit``), or the core benchmark suite
   against random and ShortGPT (``paper``, needs the evaluation extra).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from gateskip.errors import GateSkipError

RECIPES = ("fit", "paper")


def demo(out: str = "runs/demo", model: str = "smollm2-135m", recipe: str = "fit", batches: int = 32,
         sequential_batches: int = 8, compare: str = "0.15,0.3,0.45,0.6", baselines: str = "3,6,9,12",
         steps: int = 40, gate: str = "lowrank",
         ratio: float = 0.3, prompts: int = 2, max_new_tokens: int = 40, evaluate: bool = True,
         limit: int = 60, ratios: str = "0.15,0.3,0.45", methods: str = "gateskip,random,shortgpt",
         threads: int = 2) -> None:
    """Run the main job on the embedded default model: make gates, generate with skipping, compare.

    Recipe ``fit`` (default, the best measured one; ~9 min on 2 cores): rank-64 fallbacks for skipped
    tokens and rank-16 gates fitted in closed form, then refitted under skipping (``gateskip fit``); then
    generation with and without skipping; then held-out CE at matched compute against random skipping
    with the same fallback, the residual oracle, ShortGPT and ShortGPT with linear replacement.
    Recipe ``paper``: the paper's gates (zero for skipped tokens) trained for ``steps`` steps
    (``gateskip train``), then the core benchmark suite against random skipping and ShortGPT.

    Args:
        out: output folder (gates/ and the recipe's reports).
        model: base model (the embedded smollm2-135m by default).
        recipe: fit (closed-form fallbacks and gates) or paper (trained gates, zero fallback).
        batches: fit: calibration batches of 4 x 256 tokens for the fits.
        sequential_batches: fit: calibration batches of the refit under skipping (one pass per branch).
        compare: fit: skip ratios of every branch at which the held-out CE is compared.
        baselines: fit: ShortGPT layer counts (with and without linear replacement).
        steps: paper: gate training steps (a short run; see BENCHMARKS.md for longer ones).
        gate: paper: gate kind: lowrank (cheap: ~1% FLOPs on SmolLM2), vector (the paper's), scalar.
        ratio: skip ratio of the generation examples.
        prompts: number of example instructions to generate from.
        max_new_tokens: tokens generated per example.
        evaluate: run the comparison (paper: the core suite, needs the eval extra: lm-eval).
        limit: paper: items per task of the suite.
        ratios: paper: skip ratios of GateSkip and random in the suite, comma-separated.
        methods: paper: suite methods besides dense (see ``gateskip eval --help``).
        threads: torch CPU threads.
    """
    from gateskip.policies import check_ratio

    check_ratio(ratio)
    if recipe not in RECIPES:
        raise GateSkipError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    torch.set_num_threads(threads)
    out_dir = Path(out)
    gates_dir = out_dir / "gates"
    t0 = time.perf_counter()
    if recipe == "fit":
        from gateskip.commands.fit import fit

        _say(f"1/3 fitting rank-64 fallbacks and rank-16 gates on {model} ({batches} x 4 x 256 tokens), refitted "
             f"under skipping 0.3 -> {gates_dir}")
        fit(model=model, out=str(gates_dir), batches=batches, sequential=0.3, sequential_batches=sequential_batches,
            compare="", threads=threads)
    else:
        from gateskip.train import train

        _say(f"1/3 training {gate} gates on {model} for {steps} steps (the paper's recipe) -> {gates_dir}")
        train(model=model, out=str(gates_dir), steps=steps, gate=gate)
    _say(f"    done in {time.perf_counter() - t0:.0f}s")
    _generate(model, gates_dir, ratio, prompts, max_new_tokens)
    if not evaluate:
        return
    if recipe == "fit":
        from gateskip.commands.fit import fit

        _say(f"3/3 held-out CE at skip ratios {compare} and ShortGPT with {baselines} layers removed -> {out_dir}")
        fit(gates=str(gates_dir), out=str(out_dir / "compare"), fallback="keep", fit_gates=False, sequential=0,
            compare=compare, compare_scopes="both", compare_batches=4, baselines=baselines, sequential_batches=4,
            batches=2, threads=threads)
        _say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: see {out_dir / 'compare' / 'compare.md'}")
        return
    if importlib.util.find_spec("lm_eval") is None:
        _say("3/3 skipped: the benchmark suite needs lm-eval (pip install 'gateskip[eval]')")
        return
    try:
        from gateskip.eval import evaluate as run_eval
    except ImportError as e:
        raise GateSkipError(f"the evaluation module is unavailable ({e}): reinstall gateskip") from None
    _say(f"3/3 core suite: {methods} (limit {limit}) at ratios {ratios} -> {out_dir}")
    run_eval(gates=str(gates_dir), suite="core", ratios=ratios, limit=limit, out=str(out_dir), threads=threads,
             methods=methods, fidelity_prompts=0)
    _say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: see {out_dir / 'report.md'} and {out_dir / 'curve.png'}")


def _generate(model: str, gates_dir: Path, ratio: float, prompts: int, max_new_tokens: int) -> None:
    from gateskip.checkpoint import load_gates
    from gateskip.core import remove_gates
    from gateskip.data import sample_prompts
    from gateskip.generate import complete, summary_line
    from gateskip.models import load_model

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


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)
