"""The main job (``make demo``): make gates for SmolLM2, then show what skipping does and costs.

1. Make gates on offline text, never on evaluation items: recipe ``best`` (the default) fits fallbacks and
   gates in closed form and heals them end to end for a short run (``gateskip train``'s defaults, fewer
   steps); ``fit`` stops after the closed-form fit (``gateskip fit``); ``paper`` trains the paper's gates
   (``gateskip train --config paper``).
2. Generate from a few instructions with the original dense model and with skipping, printing the tokens
   skipped (the paper's measure) and the FLOP-weighted compute saved (gates and fallbacks counted).
3. Compare at matched compute: held-out CE against the original dense model, random skipping with the same
   fallback, the oracle, ShortGPT and ShortGPT with linear replacement (``best``, ``fit``), or the core
   benchmark suite against random and ShortGPT (``paper``, needs the evaluation extra).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from gateskip.errors import GateSkipError

RECIPES = ("best", "fit", "paper")


def demo(out: str = "runs/demo", model: str = "smollm2-135m", recipe: str = "best", fallback_batches: int | None = None,
         heal_steps: int | None = None, compare: list[float] = (0.15, 0.3, 0.45, 0.6, 0.7, 0.8), baselines: list[int] = (3, 6, 9, 12),
         steps: int = 40, gate: str = "lowrank",
         saved: float = 0.15, prompts: int = 2, max_new_tokens: int = 64, evaluate: bool = True,
         limit: int = 60, ratios: list[str] = ("0.15", "0.3", "0.45"), methods: list[str] = ("gateskip", "random", "shortgpt"),
         threads: int = 2) -> None:
    """Run the main job on the embedded default model: make gates, generate with skipping, compare.

    Recipe ``best`` (default, the best measured one): gates on the MLP branches with neurons fallbacks for skipped
    tokens and rank-16 gates fitted in closed form on ``mix`` and the model's own chat answers and refitted under
    skipping, then ``heal_steps`` steps of self-distillation with the backbone frozen at 60% of the MLP tokens
    skipped (``gateskip train``'s defaults; it trains 150); then generation with and without skipping at a budget
    in compute saved; then held-out CE at matched compute against random skipping with the same fallback, the
    residual oracle, ShortGPT and ShortGPT with linear replacement.
    Recipe ``fit``: the closed-form fit alone (``gateskip fit``), then the same. Recipe ``paper``: the
    paper's gates (zero for skipped tokens) trained for ``steps`` steps (``gateskip train --config paper``),
    then the core benchmark suite against random skipping and ShortGPT.

    Args:
        out: output folder (gates/ and the recipe's reports).
        model: base model (the embedded smollm2-135m by default).
        recipe: best (fitted, then healed), fit (closed-form fallbacks and gates) or paper (trained gates,
            zero fallback).
        fallback_batches: best, fit: calibration batches of 4 x 256 tokens for the closed-form fits (default: the
            shipped ``demo`` recipe's, 8).
        heal_steps: best: end-to-end training steps after the fit (default: the shipped ``demo`` recipe's, 60).
        compare: best, fit: skip ratios of every gated branch at which the held-out CE is compared.
        baselines: best, fit: ShortGPT layer counts (with and without linear replacement).
        steps: paper: gate training steps (a short run; see docs/benchmark-log.md for longer ones).
        gate: paper: gate kind: lowrank (cheap: ~1% FLOPs on SmolLM2), vector (the paper's), scalar.
        saved: compute saved by the generation examples (a budget: the skip ratio is steered while generating).
        prompts: number of example instructions to generate from.
        max_new_tokens: tokens generated per example.
        evaluate: run the comparison (paper: the core suite, needs the eval extra: lm-eval).
        limit: paper: items per task of the suite.
        ratios: paper: skip ratios of GateSkip and random in the suite.
        methods: paper: suite methods besides dense (see ``gateskip eval --help``).
        threads: torch CPU threads.
    """
    from gateskip.saved import check_saved

    if recipe not in RECIPES:
        raise GateSkipError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    check_saved(saved)
    torch.set_num_threads(threads)
    from gateskip.recipes import load_recipe

    shipped = load_recipe("demo")  # what the best recipe trains here: train's defaults, a short healing run
    batches = shipped["fallback_batches"] if fallback_batches is None else fallback_batches
    heal_steps = shipped["steps"] if heal_steps is None else heal_steps
    out_dir = Path(out)
    gates_dir = out_dir / "gates"
    t0 = time.perf_counter()
    _make_gates(recipe, model, gates_dir, shipped, batches, heal_steps, steps, gate, threads)
    _say(f"    done in {time.perf_counter() - t0:.0f}s")
    _generate(model, gates_dir, saved, prompts, max_new_tokens)
    if not evaluate:
        return
    if recipe in ("best", "fit"):
        _compare(out_dir, gates_dir, compare, baselines, threads, t0)
    else:
        _suite(out_dir, gates_dir, ratios, limit, methods, threads, t0)


def _make_gates(recipe: str, model: str, gates_dir: Path, shipped: dict, batches: int, heal_steps: int, steps: int,
                gate: str, threads: int) -> None:
    """Step 1: the recipe's gates written to ``gates_dir``."""
    if recipe == "fit":
        from gateskip.commands.fit import fit

        _say(f"1/3 fitting the recommended gates (rank-16 gates and neurons fallbacks on the MLPs) on {model} "
             f"({batches} x 4 x 256 tokens) in closed form, refitted under skipping -> {gates_dir}")
        fit(model=model, out=str(gates_dir), fallback_batches=batches, compare="", threads=threads)
    elif recipe == "best":
        from gateskip.commands.train import train

        _say(f"1/3 fitting fallbacks and gates on {model} in closed form, then healing them for {heal_steps} "
             f"steps (self-distillation on mix and the model's own chat answers, backbone frozen, 60% of the MLP tokens "
             f"skipped) -> {gates_dir}")
        train(**{**shipped, "model": model, "out": str(gates_dir), "steps": heal_steps, "fallback_batches": batches,
                 "resume": False})
    else:
        from gateskip.commands.train import train
        from gateskip.recipes import load_recipe

        _say(f"1/3 training {gate} gates on {model} for {steps} steps (the paper's recipe) -> {gates_dir}")
        train(**{**load_recipe("paper"), "model": model, "out": str(gates_dir), "steps": steps, "gate": gate,
                 "resume": False})


def _compare(out_dir: Path, gates_dir: Path, compare, baselines, threads: int, t0: float) -> None:
    """Step 3 of ``best`` and ``fit``: held-out CE at matched compute against the baselines (``gateskip fit``)."""
    from gateskip.commands.fit import fit

    _say(f"3/3 held-out CE at skip ratios {_csv(compare)} and ShortGPT with {_csv(baselines)} layers removed "
         f"-> {out_dir}")
    fit(init=str(gates_dir), out=str(out_dir / "compare"), fit_gates=False, fit_ratio=0, compare=compare,
        compare_scopes="both", compare_batches=4, baselines=baselines, fallback_batches=2, threads=threads)
    _say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: see {out_dir / 'compare' / 'compare.md'}")


def _suite(out_dir: Path, gates_dir: Path, ratios, limit: int, methods, threads: int, t0: float) -> None:
    """Step 3 of ``paper``: the core benchmark suite (``gateskip eval``), skipped without lm-eval."""
    if importlib.util.find_spec("lm_eval") is None:
        _say("3/3 skipped: the benchmark suite needs lm-eval (pip install 'gateskip[eval]')")
        return
    try:
        from gateskip.commands.eval import evaluate as run_eval
    except ImportError as e:
        raise GateSkipError(f"the evaluation module is unavailable ({e}): reinstall gateskip") from None
    _say(f"3/3 core suite: {_csv(methods)} (limit {limit}) at ratios {_csv(ratios)} -> {out_dir}")
    run_eval(gates=str(gates_dir), suite="core", ratios=ratios, limit=limit, out=str(out_dir), threads=threads,
             methods=methods, fidelity_prompts=0)
    _say(f"done in {(time.perf_counter() - t0) / 60:.1f} min: see {out_dir / 'report.md'} and {out_dir / 'curve.png'}")


def _generate(model: str, gates_dir: Path, saved: float, prompts: int, max_new_tokens: int) -> None:
    from gateskip.checkpoint import load_gates
    from gateskip.commands.generate import summary_line
    from gateskip.core import remove_gates
    from gateskip.data import sample_prompts
    from gateskip.generation import generate
    from gateskip.models import load_model

    _say(f"2/3 generating with and without skipping ({saved:.0%} of the compute saved, threshold policy)")
    net, tok = load_model(model)
    load_gates(net, gates_dir)
    for prompt in sample_prompts()[:prompts]:
        print(f"\n### {prompt}")
        out = generate(net, tok, prompt, max_new_tokens=max_new_tokens)  # the original model (a healed backbone's
        print(f"--- dense (the original model): {out.new_tokens} new tokens, {out.tokens_per_s:.1f} tokens/s")  # too)
        print(out.text.strip())
        out = generate(net, tok, prompt, saved=saved, max_new_tokens=max_new_tokens)
        print(f"--- {summary_line(out.stats, 'threshold', 0.0, saved)} rechecked={out.stats['rechecked']}, "
              f"{out.new_tokens} new tokens, {out.tokens_per_s:.1f} tokens/s")
        print(out.text.strip())
    remove_gates(net)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _csv(values) -> str:
    return values if isinstance(values, str) else ",".join(str(v) for v in values)
