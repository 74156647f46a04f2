"""The argument groups of running and measuring skipping (``gateskip generate``, ``eval``, ``fit``'s comparison,
``bench``): how tokens skip, the suites, the lm-eval harness, the comparison, allocations, timing, speculation."""

from __future__ import annotations

from dataclasses import dataclass

from gateskip.args.checks import _at_least, _choice
from gateskip.errors import GateSkipError
from gateskip.saved import GENERATION_PROMPT_BOOST


@dataclass(frozen=True)
class SkipArgs:
    """How tokens are chosen to skip at inference: the same options, meanings and defaults in ``gateskip generate``,
    ``eval`` and ``quantize``, and ``gateskip.generate``. The budget itself is the command's ``--ratio``/``--ratios``
    (the paper's knob: the fraction of tokens each branch skips) or ``--saved`` (FLOP-weighted compute saved).

    Args:
        policy: threshold (calibrated per token: causal, what generation runs), quantile (the paper's, per
            call) or random; default: threshold for calibrated gates (every gates folder), else quantile.
        modules: branch kinds that skip: attn, mlp or attn,mlp (a kind without gates never skips).
        kv: K/V of skipped attention tokens: copy (from the layer below) or compute; default: the gates'.
        allocation: uniform (every branch skips the ratio) or global (one calibrated threshold for all branches,
            FLOP-weighted total ratio).
        protect_first: never skip the first N tokens (BOS, the attention sink); default: the gates'.
        protect_last: never skip a prompt's last position (its logits choose the first answer token); default:
            the gates'.
        protect_tail: never skip the last N positions of a prompt (in a passage-then-question prompt: the
            question); 0: off.
        recheck_stops: generation: a step whose top token ends the answer is computed again without skipping (its
            compute counted), so an answer ends only where the model without skipping ends it on the same text.
        recheck_below: generation: the same for steps whose top probability is below this value (0: off).
        prompt_boost: generation with a compute-saved budget: the prompt aims at this times the budget, the
            answer makes up the rest.
        execution: how a call with some tokens skipped runs, gathering its kept tokens or computing all and
            blending (the same outputs): cached (a table measured on this model and machine if one is cached, else the
            built-in rule), measured (timed once, about a minute, then cached; gateskip.execution_costs) or rule.
        seed: random seed of the random policy (and of sampling).
    """

    policy: str | None = None
    modules: tuple[str, ...] = ("attn", "mlp")
    kv: str | None = None
    allocation: str = "uniform"
    protect_first: int | None = None
    protect_last: bool | None = None
    protect_tail: int = 0
    recheck_stops: bool = True
    recheck_below: float = 0.0
    prompt_boost: float = GENERATION_PROMPT_BOOST
    execution: str = "cached"
    seed: int = 0

    def __post_init__(self) -> None:
        from gateskip.budget import check_allocation
        from gateskip.config import KV_MODES, MODULE_KINDS
        from gateskip.execution import check_execution
        from gateskip.policies import POLICY, check_policy
        from gateskip.recheck import check_recheck_below

        modules = self.modules.split(",") if isinstance(self.modules, str) else self.modules
        object.__setattr__(self, "modules", tuple(m.strip() for m in modules if m.strip()))
        if not self.modules or set(self.modules) - set(MODULE_KINDS):
            raise GateSkipError(f"modules={','.join(self.modules)!r} is invalid: use attn, mlp or attn,mlp")
        check_policy(self.policy)
        if self.policy is not None and POLICY[self.policy].given_scores:
            raise GateSkipError(f"--policy {self.policy} ranks tokens by scores measured on each batch beforehand, "
                                "which a command cannot give: compare it with gateskip fit --scored-oracle marginal")
        if self.kv is not None:
            _choice("kv", self.kv, KV_MODES)
        check_allocation(self.allocation)
        check_recheck_below(self.recheck_below)
        check_execution(self.execution)
        _at_least(self, protect_first=0, protect_tail=0)
        if not self.prompt_boost > 0:
            raise GateSkipError(f"prompt_boost={self.prompt_boost} is invalid: use a positive factor (1: none)")

    def skipping(self) -> dict:
        """Keyword arguments of ``gateskip.skipping`` / ``gateskip.generate`` (the recheck's stop tokens and the
        budget are the caller's)."""
        return {"policy": self.policy, "modules": self.modules, "kv": self.kv, "allocation": self.allocation,
                "protect_first": self.protect_first, "protect_last": self.protect_last, "seed": self.seed,
                "protect_tail": self.protect_tail, "execution": self.execution,
                "recheck_below": self.recheck_below}


@dataclass(frozen=True)
class SuiteArgs:
    """``gateskip eval --suite``: the paired sweep's rows, fallbacks, generation fidelity and resumption.

    Args:
        random_ratios: ratios of the random method (default: the numeric --ratios).
        oracle_ratios: ratios of the oracle method (default: the random ones): a ceiling, not a method; it computes
            every branch and skips the tokens whose skipping changes it least.
        shortgpt_layers: numbers of layers ShortGPT removes, one row each.
        protect_prompt: suite chat: never skip a prompt at all (only generated tokens skip).
        fidelity_prompts: core suite: held-out prompts for generation fidelity (0: off).
        fidelity_prompt_tokens: core suite: length of each fidelity prompt in tokens.
        fidelity_tokens: greedy tokens generated per fidelity prompt (suite chat: per request).
        shared_prefix: score a multiple-choice item's shared context once and its choices from the KV cache (exact
            under the threshold policy; the quantile policy always runs whole requests).
        fallback: what skipped tokens of the gateskip and random rows get: default the gates folder's own; a kind
            (mean, linear, lowrank) other than the folder's is fitted (gateskip.fit_fallback) and the rows are
            named gateskip+KIND and random+KIND.
        fallback_rank: rank of a lowrank fallback.
        fallback_batches: batches of 4 x 256 tokens (train split of the mix text) to fit fallbacks on: --fallback
            and method shortgpt_linear.
        reference: the method the who-wins table compares every other against (default: gateskip+KIND of
            --fallback if present, else gateskip).
        resume: suites core and gen: every task score is written to OUT/partial.json as soon as it is measured,
            and a rerun of the same sweep keeps them (an interrupted sweep resumes); --no-resume starts over.
        reuse_dense: with --compare-with: take the dense row of the first run to merge when it used the same
            model, items, prefix sharing and fidelity prompts (after re-scoring the first 8 items of every task
            and finding them equal) instead of scoring it again; --no-reuse-dense scores it.
        offset: skip the first N items of every task. The default scores items 0..limit-1 (the test items every
            published figure uses); --offset 500 --limit 200 scores items 500-699, a dev split to choose recipes
            on without touching the test items.
    """

    random_ratios: list[str] | None = None
    oracle_ratios: list[str] | None = None
    shortgpt_layers: list[int] = (4, 10, 16)
    protect_prompt: bool = False
    fidelity_prompts: int = 32
    fidelity_prompt_tokens: int = 48
    fidelity_tokens: int = 64
    shared_prefix: bool = True
    fallback: str | None = None
    fallback_rank: int = 64
    fallback_batches: int = 12
    reference: str | None = None
    resume: bool = True
    reuse_dense: bool = True
    offset: int = 0

    def __post_init__(self) -> None:
        _at_least(self, fidelity_prompts=0, fidelity_prompt_tokens=1, fidelity_tokens=1, offset=0)


@dataclass(frozen=True)
class HarnessArgs:
    """``gateskip eval`` without --suite: the lm-eval harness sweep's own options.

    Args:
        calib_batches: batches of 4 x 256 tokens for Block Influence and mean gate values (train split of the
            mix text: BoolQ passages + Shakespeare, never evaluation items).
        mod: a MoD folder (``gateskip train-mod --out``) for methods mod and mod_topk.
        exit_measure: confidence of method early_exit: softmax (top-1 minus top-2) or saturation.
        quant: quantize the backbone's linear layers first: none, int4 or int8 (gateskip.quantize); rows are
            then named e.g. gateskip[int4] and dense[int4]. A model object is quantized in place.
        prune: method pruned_gateskip: remove this many layers of lowest Block Influence (ShortGPT) from the
            gated model, then skip with its remaining gates at every ratio.
        recalibrate: method pruned_gateskip: re-fit the remaining gates' thresholds on calibration text after
            pruning (their inputs changed).
    """

    calib_batches: int = 4
    mod: str | None = None
    exit_measure: str = "softmax"
    quant: str = "none"
    prune: int = 4
    recalibrate: bool = True


@dataclass(frozen=True)
class CompareArgs:
    """``gateskip fit``'s held-out comparison: the fitted gates between random tokens (the floor) and the oracle
    that computes the branch (the ceiling), with the same fallback, and static baselines.

    Args:
        compare: skip ratios of the held-out comparison (empty: none).
        compare_batches: held-out batches of the comparison.
        compare_scopes: which branches skip in the --compare rows: attn, mlp and/or both (default: each gated
            kind, and both when both are gated).
        compare_policy: how the gates rows pick tokens: quantile (exactly the ratio of each branch per batch,
            like the oracle) or threshold (the folder's calibrated per-token thresholds: causal, what eval and
            generate run; the ratio skipped then follows the text).
        compare_metric: what the comparison scores: ce (next-token cross-entropy of the text) or kl (KL from the
            dense model's next-token distribution, per token: needs no labels and, unlike CE, does not credit a
            healed backbone for fitting the text's domain).
        compare_data: held-out text of the comparison (default: --data), e.g. qa: question-answer text from sets
            the evaluation suite does not score.
        compare_budgets: JSON files of per-branch ratios also compared (random / gates / oracle).
        scored_oracle: also measure an oracle that ranks each branch's tokens by their measured effect on the
            outputs (gateskip.oracle_scores): fisher (second order, four backward passes per batch) or marginal
            (exact KL of skipping each token alone: about --oracle-horizon tokens of compute per token and branch).
            Whether better token choice than the residual oracle's has room to gain. Empty: off.
        oracle_horizon: the marginal oracle's horizon: each token's KL summed over this many predictions from it
            on (the same for every token; the last ones of a row, with fewer after them, are never skipped by it).
        baselines: ShortGPT layer counts, e.g. 3,6,9: after the comparison, the same held-out CE for ShortGPT
            (lowest Block Influence layers removed) and ShortGPT with each removed layer replaced by a fitted
            linear map (baselines.shortgpt.linear_replaced, fitted on the --fallback-batches calibration
            batches), with their compute saved. Empty: none.
    """

    compare: list[float] = (0.15, 0.3, 0.5)
    compare_batches: int = 8
    compare_scopes: list[str] | None = None
    compare_policy: str = "quantile"
    compare_metric: str = "ce"
    compare_data: str | None = None
    compare_budgets: list[str] = ()
    scored_oracle: str = ""
    oracle_horizon: int = 32
    baselines: list[int] = ()

    def __post_init__(self) -> None:
        _choice("compare_policy", self.compare_policy, ("quantile", "threshold"))
        _choice("compare_metric", self.compare_metric, ("ce", "kl"))
        _choice("scored_oracle", self.scored_oracle, ("", "fisher", "marginal"))
        _at_least(self, compare_batches=1, oracle_horizon=1)


@dataclass(frozen=True)
class AllocateArgs:
    """``gateskip fit --allocate``: per-branch ratios that reach FLOP-weighted compute-saved targets.

    Args:
        allocate: FLOP-weighted compute-saved targets, e.g. 0.1,0.2,0.3,0.4: measure each branch's sensitivity
            (CE when it alone skips, its gates choosing) and write per-branch ratios alloc_<target>.json
            (gateskip.allocate); thresholds are then calibrated under the middle one. Empty: none.
        sens_batches: calibration batches the sensitivity is measured on.
        sens_steps: skip ratios at which each branch's sensitivity is measured.
    """

    allocate: list[float] = ()
    sens_batches: int = 2
    sens_steps: list[float] = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TimingArgs:
    """``gateskip bench``: the shapes timed and how the clock is read.

    Args:
        prefill_batch: prompts per prefill batch.
        prefill_len: tokens per prefill prompt.
        decode_batches: batch sizes for decode.
        prompt_len: prompt tokens before decoding.
        new_tokens: tokens generated per decode run.
        repeats: timed repeats per setting (medians reported).
        warmup: untimed rounds before the timed ones (same shapes, 8 decode steps).
        clock: ``wall`` (elapsed time) or ``cpu`` (this process's CPU time: on a machine shared with other jobs,
            use it with --threads 1, where it tracks what an idle core would take).
        decode_timing: ``interleaved`` (settings take turns one decode step at a time, each with its own cache:
            drift hits them alike) or ``generate`` (``model.generate``, one setting after another).
    """

    prefill_batch: int = 4
    prefill_len: int = 512
    decode_batches: list[int] = (1, 8)
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    clock: str = "wall"
    decode_timing: str = "interleaved"

    def __post_init__(self) -> None:
        if min(self.repeats, self.prefill_batch, self.prefill_len, self.prompt_len) < 1 or self.new_tokens < 2 \
                or self.warmup < 0:
            raise GateSkipError("repeats, prefill sizes and prompt-len must be >= 1, new-tokens >= 2, warmup >= 0")
        _choice("clock", self.clock, ("wall", "cpu"))
        _choice("decode-timing", self.decode_timing, ("interleaved", "generate"))


@dataclass(frozen=True)
class SpeculativeArgs:
    """``gateskip bench --speculative``: lossless self-speculative decoding against dense greedy decoding.

    Args:
        speculative: benchmark lossless self-speculative decoding against dense greedy decoding of the same
            prompts instead (acceptance rate, mean accepted length, tokens/s, output identity).
        draft_ratio: with --speculative: draft skip ratios, or JSON files mapping branch names to ratios.
        k: with --speculative: draft lengths.
        verify: with --speculative: gated (gates on, nothing skipped) or ungated (gates bypassed).
        prompts: with --speculative: number of instruction prompts (chat template), decoded one by one.
    """

    speculative: bool = False
    draft_ratio: list[str] = ("0.25", "0.5")
    k: list[int] = (2, 4)
    verify: str = "gated"
    prompts: int = 4


@dataclass(frozen=True)
class RandomGatesArgs:
    """``gateskip bench --random-gates``: untrained gates with diverse random importances, timed like trained ones
    (no training needed; the method's upper bound on speed).

    Args:
        random_gates: attach untrained gates with diverse random importances instead of --gates.
        gate: gate kind(s) of the random gates: vector, lowrank, scalar, mlp (comma-separated: each timed).
        rank: inner size of lowrank gates.
        fallback: what skipped tokens of the random gates get, zero (paper) or a mean, lowrank or linear fallback
            (unfitted: the same operations as a fitted one, so the same speed); a gates folder brings its own.
            Comma-separated (``zero,lowrank``): every kind is measured in the same run, against the same dense
            timings, settings named ``gate+fallback@ratio``.
        fallback_rank: inner size of a lowrank fallback.
    """

    random_gates: bool = False
    gate: list[str] = ("vector",)
    rank: int = 16
    fallback: list[str] = ("zero",)
    fallback_rank: int = 64

    def __post_init__(self) -> None:
        from gateskip.config import FALLBACK_KINDS

        fallbacks = self.fallback.split(",") if isinstance(self.fallback, str) else self.fallback
        object.__setattr__(self, "fallback", [f.strip() for f in fallbacks if f.strip()] or ["zero"])
        for fb in self.fallback:
            _choice("fallback", fb, FALLBACK_KINDS)
