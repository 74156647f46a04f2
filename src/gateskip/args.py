"""Typed argument groups, one dataclass per concern, shared by the library, the recipes and the CLI.

Each default is written once, here (and the gates' in ``config.RECOMMENDED``): ``gateskip.train.fit`` takes a
``TrainArgs``, ``gateskip train`` takes every group below, the CLI makes one flag per field (commands/cli.py,
help from each class's ``Args:``), and a recipe YAML (recipes/) is a flat or per-group mapping of fields. Each
group checks its own values on construction, so a command and the library never check the same thing twice.

flags.py turns a flat set of flags (``--steps 200 --lr 1e-3``, ``steps=200`` from Python or a YAML) into these
groups: a name belongs to exactly one group of a command.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateskip.config import _choice
from gateskip.errors import GateSkipError
from gateskip.saved import GENERATION_PROMPT_BOOST

BACKBONES = ("frozen", "lora", "full")
OBJECTIVES = ("ce", "distill", "ce+distill")
NEW_GATES_RAMP, FITTED_GATES_RAMP = 0.8, 0.1  # share of the steps the skip ratio ramps over


def _at_least(group: object, **least) -> None:
    for name, low in least.items():
        value = getattr(group, name)
        if value is not None and value < low:
            raise GateSkipError(f"{name}={value} is invalid: use a value >= {low}")


def _ratio(name: str, value: float | None) -> None:
    if value is not None:
        from gateskip.policies import check_ratio

        check_ratio(value, name)


@dataclass(frozen=True)
class TextArgs:
    """The text gates are fitted, trained and calibrated on.

    Args:
        data: training text: boolq, lambada, shakespeare, mix, qa, chat (the model's own greedy answers to chat
            requests, in its chat template: self-distillation text, written once into the gateskip cache),
            several joined by commas (interleaved, e.g. mix,chat), a .txt/.jsonl file, or a dataset.
        seq_len: tokens per packed row.
        batch_size: rows per micro-batch on each process (torchrun: the global batch is N times this).
        limit_texts: use at most this many training texts.
        chat_texts: with --data chat: how many self-distillation answers to write (once per model and number).
    """

    data: str = "mix,chat"
    seq_len: int = 256
    batch_size: int = 4
    limit_texts: int | None = None
    chat_texts: int = 1200

    def __post_init__(self) -> None:
        _at_least(self, seq_len=2, batch_size=1, limit_texts=1, chat_texts=1)


@dataclass(frozen=True)
class StartArgs:
    """Where training starts: closed-form gates and fallbacks, a gates folder, or new gates.

    Args:
        init: fit: new gates (the gate flags), their fallbacks and gates fitted in closed form on
            ``fallback_batches`` training batches and refitted under skipping ``fit_ratio`` (``gateskip fit``'s
            recipe; kept in out/fit, reused on resume); a gates folder (e.g. from ``gateskip fit``): start from
            it, its config kept except the gate flags given (a different fallback is fitted again; modules: the
            subset of its kinds that skip); none: new gates as initialised (the paper).
        fit_ratio: init=fit: the skip ratio (every skipping branch, quantile) the closed-form fit is refitted
            under.
        fallback_batches: batches of batch_size x seq_len training tokens the fallbacks (and with init=fit, the
            gates) are fitted on.
    """

    init: str | None = "fit"
    fit_ratio: float = 0.45
    fallback_batches: int = 8

    def __post_init__(self) -> None:
        if self.init in ("", "none"):
            object.__setattr__(self, "init", None)
        _ratio("fit_ratio", self.fit_ratio)
        _at_least(self, fallback_batches=1)

    @property
    def fitted(self) -> bool:
        """The gates start fitted (closed form or a folder), not as initialised."""
        return self.init is not None

    @property
    def folder(self) -> str | None:
        """The gates folder training starts from, if any."""
        return self.init if self.init not in (None, "fit") else None


@dataclass(frozen=True)
class TrainArgs:
    """The training loop (``gateskip.train.fit``): schedule, objective, what trains, checkpoints.

    Args:
        steps: optimizer steps.
        grad_accum: micro-batches per optimizer step.
        lr: learning rate of the gates.
        warmup: learning-rate warm-up steps.
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
        ramp_steps: steps of the linear ramp 0 -> max_ratio (default: 10% of the steps for gates that start
            fitted, 80% for new gates).
        budget: JSON file of per-branch skip ratios (e.g. ``alloc_0.25.json`` from ``gateskip fit --allocate``):
            training skips those ratios, ramped from 0 over ``ramp_steps`` (``max_ratio`` is then unused), and
            thresholds are calibrated under them. From Python, the mapping itself (branch name -> ratio) works too.
        straight_through: a skipped token's gate still receives the task gradient it would get if the
            token were kept (its output stays 0). Without it, a skipped token's gate only feels the
            sparsity penalty, so skipped tokens tend to stay skipped. Not in the paper; placement=after only.
        train_fallback: train the fallbacks end to end with the gates (learning rate ``fallback_lr``; needs
            fallbacks other than zero).
        fallback_lr: learning rate of the fallbacks.
        save_every: checkpoint interval in steps.
        keep_checkpoints: newest checkpoints kept on disk (>= 2 keeps a fallback if the latest is damaged).
        resume: continue from out/checkpoint if present.
        seed: random seed (data order, init).
    """

    steps: int = 150
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    backbone: str = "frozen"
    backbone_lr: float = 1e-3
    lora_rank: int = 8
    objective: str = "distill"
    sparsity_kind: str = "l2"
    lam: float = 0.0
    kl_target: float = 0.5
    max_ratio: float = 0.6
    min_ratio: float | None = None
    ramp_steps: int | None = None
    budget: str | dict | None = None
    straight_through: bool = False
    train_fallback: bool = True
    fallback_lr: float = 1e-4
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("backbone", self.backbone, BACKBONES)
        _choice("objective", self.objective, OBJECTIVES)
        from gateskip.losses import check_sparsity_kind

        check_sparsity_kind(self.sparsity_kind)
        _at_least(self, steps=1, grad_accum=1, save_every=1, keep_checkpoints=1, lora_rank=1, warmup=0,
                  ramp_steps=1)
        _ratio("max_ratio", self.max_ratio)
        if self.min_ratio is not None:
            if self.budget:
                raise GateSkipError("min_ratio (a budget ladder) and budget (fixed per-branch ratios) exclude each "
                                    "other: pass one")
            if not 0.0 <= self.min_ratio <= self.max_ratio:
                raise GateSkipError(f"min_ratio={self.min_ratio} is invalid: use 0 <= min_ratio <= max_ratio "
                                    f"({self.max_ratio})")

    def budget_ratios(self) -> dict | None:
        """The per-branch ratios of ``budget`` (read from its JSON file), or None."""
        if self.budget is None or isinstance(self.budget, dict):
            return self.budget
        from gateskip.allocate import read_budget

        return read_budget(self.budget)

    def ramp(self, fitted: bool = False) -> int:
        """The steps the skip ratio ramps over: ``ramp_steps``, else a share of the steps (short for gates that
        start fitted, the paper's long ramp for new ones)."""
        if self.ramp_steps is not None:
            return self.ramp_steps
        return max(1, int((FITTED_GATES_RAMP if fitted else NEW_GATES_RAMP) * self.steps))


@dataclass(frozen=True)
class CalibrationArgs:
    """Thresholds calibrated after training, on held-out text of the same mix.

    Args:
        calibrate_ratio: ratio at which thresholds are calibrated after training (on held-out text).
        calibrate_batches: batches of held-out text for calibration.
    """

    calibrate_ratio: float = 0.5
    calibrate_batches: int = 8

    def __post_init__(self) -> None:
        _ratio("calibrate_ratio", self.calibrate_ratio)
        _at_least(self, calibrate_batches=1)


@dataclass(frozen=True)
class RunArgs:
    """Where and how a job runs, and how its output is stored.

    Args:
        device: auto (a GPU when there is one), cpu, cuda or cuda:N; under torchrun each process uses its
            LOCAL_RANK GPU.
        dtype: float32 or bfloat16 for the backbone.
        quant: train the gates on a 4-bit (int4) or 8-bit (int8) weight-only quantized backbone (frozen;
            gateskip.quantize), e.g. to run them quantized later: ``eval --quant int4``. none: float.
        fsdp: shard model, gates and optimizer state with FSDP2 across torchrun processes (for models whose
            weights plus gate training state do not fit one GPU; see docs/distributed.md).
        save_dtype: how the gates folder stores gates, fallbacks, LoRA deltas and a full backbone: float32,
            float16 or bfloat16 (half the size; loading casts them back).
    """

    device: str = "auto"
    dtype: str = "float32"
    quant: str = "none"
    fsdp: bool = False
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        from gateskip.checkpoint import SAVE_DTYPES
        from gateskip.quantize import check_quant

        check_quant(self.quant)
        _choice("save_dtype", self.save_dtype, tuple(SAVE_DTYPES))
        if check_quant(self.quant) and self.fsdp:
            raise GateSkipError(f"--quant {self.quant} trains gates on one frozen quantized backbone: drop --fsdp")


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
        recheck_stops: generation: a step whose top token ends the answer is computed again without skipping (its
            compute counted), so an answer ends only where the model without skipping ends it on the same text.
        recheck_below: generation: the same for steps whose top probability is below this value (0: off).
        prompt_boost: generation with a compute-saved budget: the prompt aims at this times the budget, the
            answer makes up the rest.
        seed: random seed of the random policy (and of sampling).
    """

    policy: str | None = None
    modules: tuple[str, ...] = ("attn", "mlp")
    kv: str | None = None
    allocation: str = "uniform"
    protect_first: int | None = None
    protect_last: bool | None = None
    recheck_stops: bool = True
    recheck_below: float = 0.0
    prompt_boost: float = GENERATION_PROMPT_BOOST
    seed: int = 0

    def __post_init__(self) -> None:
        from gateskip.budget import check_allocation
        from gateskip.config import KV_MODES, MODULE_KINDS
        from gateskip.policies import check_policy
        from gateskip.recheck import check_recheck_below

        modules = self.modules.split(",") if isinstance(self.modules, str) else self.modules
        object.__setattr__(self, "modules", tuple(m.strip() for m in modules if m.strip()))
        if not self.modules or set(self.modules) - set(MODULE_KINDS):
            raise GateSkipError(f"modules={','.join(self.modules)!r} is invalid: use attn, mlp or attn,mlp")
        check_policy(self.policy)
        if self.kv is not None:
            _choice("kv", self.kv, KV_MODES)
        check_allocation(self.allocation)
        check_recheck_below(self.recheck_below)
        _at_least(self, protect_first=0)
        if not self.prompt_boost > 0:
            raise GateSkipError(f"prompt_boost={self.prompt_boost} is invalid: use a positive factor (1: none)")

    def skipping(self) -> dict:
        """Keyword arguments of ``gateskip.skipping`` / ``gateskip.generate`` (the recheck's stop tokens and the
        budget are the caller's)."""
        return {"policy": self.policy, "modules": self.modules, "kv": self.kv, "allocation": self.allocation,
                "protect_first": self.protect_first, "protect_last": self.protect_last, "seed": self.seed,
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
    baselines: list[int] = ()

    def __post_init__(self) -> None:
        _choice("compare_policy", self.compare_policy, ("quantile", "threshold"))
        _choice("compare_metric", self.compare_metric, ("ce", "kl"))
        _at_least(self, compare_batches=1)


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
