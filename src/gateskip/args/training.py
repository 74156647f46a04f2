"""The argument groups of training (``gateskip train``, ``gateskip fit``, ``gateskip.train.fit``): text, start,
loop, calibration and run."""

from __future__ import annotations

from dataclasses import dataclass

from gateskip.args.checks import _at_least, _choice, _ratio
from gateskip.chat import CHAT_TEXTS
from gateskip.errors import GateSkipError

BACKBONES = ("frozen", "lora", "full")
OBJECTIVES = ("ce", "distill", "ce+distill")
LOSS_ON = ("all", "answers")
NEW_GATES_RAMP, FITTED_GATES_RAMP = 0.8, 0.1  # share of the steps the skip ratio ramps over


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
    chat_texts: int = CHAT_TEXTS

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
        loss_on: the positions the objective scores: all, or answers (the assistant's answers in chat-formatted
            text, e.g. ``--data chat``: where generation is judged; other text counts for nothing).
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
    loss_on: str = "all"
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
        _choice("loss_on", self.loss_on, LOSS_ON)
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
