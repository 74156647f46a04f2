"""GateSkipConfig: every choice that shapes the gates, validated once, on construction.

Defaults are the paper's (``RECOMMENDED`` is the best measured recipe's): one vector gate per attention and per MLP branch, placed after the
module, initialised almost open (bias 5 -> sigmoid 0.993, weights N(0, 0.01)), fed the module's
own (pre-normed, detached) input. docs/method-notes.md says where gateskip departs from the paper and why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from gateskip.errors import GateSkipError

GATE_KINDS = ("vector", "scalar", "lowrank", "mlp")
PLACEMENTS = ("after", "before")
MODULE_KINDS = ("attn", "mlp")
KV_MODES = ("copy", "compute")
FALLBACK_KINDS = ("zero", "mean", "lowrank", "linear", "neurons")


@dataclass
class GateSkipConfig:
    """How gates are built and attached.

    Args:
        gate: ``vector`` (H -> H, the paper's default), ``scalar`` (H -> 1), ``lowrank``
            (H -> rank -> H: ~2 * rank / H of a vector gate's FLOPs) or ``mlp`` (H -> 2H -> H).
        rank: inner size of a ``lowrank`` gate.
        placement: ``after`` multiplies the branch output (paper); ``before`` multiplies the
            branch input (the paper's much worse ablation).
        shared: one gate per module kind shared by all layers instead of one per layer.
        init_bias: gate bias at init; 5.0 keeps every gate ~open so the model starts unchanged.
        init_std: std of the gate's weight init.
        modules: which branches get gates (``attn``, ``mlp``).
        detach_input: feed the gate a detached copy of the branch input (as the authors'
            code does): gate gradients then do not flow into the backbone through the gate input.
        kv: what a skipped token leaves in the KV cache: ``copy`` (its K/V of the layer below,
            the paper) or ``compute`` (its own K/V, computed as if not skipped).
        protect_first: the first N tokens of every sequence are never skipped (0: the paper). The
            first token (BOS) is the attention sink of most LLMs: every later token attends to it, so
            skipping it changes every token's attention. Skip ratios then apply to the other tokens.
        protect_last: the last position of every prompt (a forward call with nothing cached before it) is never
            skipped. Its logits choose the first generated token, and skipping it is what turns a chat answer
            into an immediate end-of-turn; it costs one token per prompt and nothing in decode.
        protect_tokens: token ids that are never skipped wherever they occur (e.g. a chat template's control
            tokens: ``special_token_ids(tokenizer)``), in prefill and in decode.
        fallback: what a skipped token's branch output becomes (before the gate multiplies it): ``zero``
            (the paper), or a cheap map of the branch input fitted by ``gateskip.fit_fallback``: ``mean``
            (a constant vector), ``linear`` (x W + b, H x H) or ``lowrank`` (x A B + b, rank
            ``fallback_rank``). See fallback.py.
        fallback_rank: inner size of a ``lowrank`` fallback (at most the hidden size).
        fallback_mlp: the MLP branches' fallback kind when it differs from ``fallback`` (which then holds
            the attention branches'), e.g. ``fallback="lowrank", fallback_mlp="linear"``: a full H x H map
            costs ~12% of a SwiGLU MLP but ~50% of what a skipped attention token saves. None: ``fallback``.
            ``neurons`` (MLP branches only): the branch's own activation on ``fallback_neurons`` of its
            neurons, chosen and combined with x by a rank-``rank_of("mlp")`` map in closed form: a nonlinear
            fallback, e.g. ``fallback="lowrank", fallback_mlp="neurons"``.
        fallback_neurons: how many of an MLP's neurons a ``neurons`` fallback computes.
        fallback_rank_mlp: the MLP branches' fallback rank when it differs from ``fallback_rank`` (e.g. a
            rank-128 ``neurons`` map next to rank-64 attention fallbacks). None: ``fallback_rank``.
    """

    # A per-kind override that follows its general field: setting ``fallback`` alone (``--fallback zero``) sets
    # every branch's, dropping the MLPs' own; ``args.apply`` reads this.
    FOLLOWS: ClassVar[dict[str, tuple[str, ...]]] = {"fallback_mlp": ("fallback",),
                                                     "fallback_rank_mlp": ("fallback", "fallback_rank")}

    gate: str = "vector"
    rank: int = 16
    placement: str = "after"
    shared: bool = False
    init_bias: float = 5.0
    init_std: float = 0.01
    modules: tuple[str, ...] = ("attn", "mlp")
    detach_input: bool = True
    kv: str = "copy"
    protect_first: int = 0
    protect_last: bool = False
    protect_tokens: tuple[int, ...] = ()
    fallback: str = "zero"
    fallback_rank: int = 64
    fallback_mlp: str | None = None
    fallback_neurons: int = 64
    fallback_rank_mlp: int | None = None

    def __post_init__(self) -> None:
        self.modules = tuple(m.strip() for m in self.modules.split(",")) if isinstance(self.modules, str) \
            else tuple(self.modules)
        self.protect_tokens = tuple(sorted({int(t) for t in self.protect_tokens}))
        if any(t < 0 for t in self.protect_tokens):
            raise GateSkipError(f"protect_tokens={self.protect_tokens!r} is invalid: use token ids >= 0")
        if not isinstance(self.protect_last, bool):
            raise GateSkipError(f"protect_last={self.protect_last!r} is invalid: use true or false")
        _choice("gate", self.gate, GATE_KINDS)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("kv", self.kv, KV_MODES)
        _choice("fallback", self.fallback, FALLBACK_KINDS)
        if self.fallback_mlp is not None:
            _choice("fallback_mlp", self.fallback_mlp, FALLBACK_KINDS)
            if self.fallback_mlp == self.fallback:
                self.fallback_mlp = None
        if not self.modules or any(m not in MODULE_KINDS for m in self.modules):
            raise GateSkipError(f"modules={self.modules!r} is invalid: use a non-empty subset of {MODULE_KINDS}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise GateSkipError(f"rank={self.rank!r} is invalid: use a positive integer")
        if int(self.protect_first) != self.protect_first or self.protect_first < 0:
            raise GateSkipError(f"protect_first={self.protect_first!r} is invalid: use a whole number >= 0")
        if not _whole(self.fallback_rank) or self.fallback_rank < 1:
            raise GateSkipError(f"fallback_rank={self.fallback_rank!r} is invalid: use a positive integer")
        self.fallback_rank = int(self.fallback_rank)
        if not _whole(self.fallback_neurons) or self.fallback_neurons < 1:
            raise GateSkipError(f"fallback_neurons={self.fallback_neurons!r} is invalid: use a positive integer")
        self.fallback_neurons = int(self.fallback_neurons)
        if self.fallback_rank_mlp is not None:
            if not _whole(self.fallback_rank_mlp) or self.fallback_rank_mlp < 1:
                raise GateSkipError(f"fallback_rank_mlp={self.fallback_rank_mlp!r} is invalid: use a positive integer")
            self.fallback_rank_mlp = int(self.fallback_rank_mlp)
            if self.fallback_rank_mlp == self.fallback_rank:
                self.fallback_rank_mlp = None
        from gateskip.fallback import FALLBACK

        if "attn" in self.modules and FALLBACK[self.fallback].mlp_only:
            raise GateSkipError("fallback='neurons' computes some of an MLP's neurons and has no meaning for attention "
                                "branches: use fallback_mlp='neurons' with another fallback for attention")
        if self.init_std < 0:
            raise GateSkipError(f"init_std={self.init_std} is invalid: use a value >= 0")

    def check_model(self, hidden: int) -> None:
        """The checks that need the model: a low-rank fallback cannot have more rank than the hidden size."""
        for kind in self.modules:
            rank = self.rank_of(kind)
            if self.fallback_of(kind) in ("lowrank", "neurons") and rank > hidden:
                field = "fallback_rank_mlp" if kind == "mlp" and self.fallback_rank_mlp is not None else "fallback_rank"
                raise GateSkipError(f"{field}={rank} is above the hidden size {hidden}: use a rank "
                                    f"<= {hidden}, or fallback='linear' for a full-rank map")

    def fallback_of(self, kind: str) -> str:
        """The fallback kind of a branch of ``kind`` (``attn`` or ``mlp``)."""
        return self.fallback_mlp if kind == "mlp" and self.fallback_mlp is not None else self.fallback

    def fallback_spec(self) -> tuple:
        """Everything that shapes the fallback modules: two configs with the same spec have interchangeable ones."""
        return self.fallback, self.fallback_mlp, self.fallback_rank, self.fallback_neurons, self.fallback_rank_mlp

    def rank_of(self, kind: str) -> int:
        """The fallback rank of a branch of ``kind`` (``attn`` or ``mlp``)."""
        return self.fallback_rank_mlp if kind == "mlp" and self.fallback_rank_mlp is not None else self.fallback_rank

    @property
    def fallback_kinds(self) -> set[str]:
        """The fallback kinds of the gated branches (``{"zero"}``: the paper, no fallback anywhere)."""
        return {self.fallback_of(k) for k in self.modules}

    @property
    def has_fallback(self) -> bool:
        return self.fallback_kinds != {"zero"}

    def fallback_name(self) -> str:
        """``lowrank64``, ``linear``, or ``attn lowrank64 / mlp linear`` when the kinds differ."""
        from gateskip.fallback import FALLBACK

        def name(kind: str) -> str:
            return FALLBACK[self.fallback_of(kind)].label(self.rank_of(kind), self.fallback_neurons)

        if len(self.modules) == 1 or name("attn") == name("mlp"):
            return name(self.modules[0])
        return f"attn {name('attn')} / mlp {name('mlp')}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        d["protect_tokens"] = list(self.protect_tokens)
        for key, off in (("protect_last", False), ("protect_tokens", [])):  # older versions read folders without them
            if d[key] == off:
                del d[key]
        if d["fallback_mlp"] is None:  # folders without per-kind fallbacks stay readable by older versions
            del d["fallback_mlp"]
        if "neurons" not in self.fallback_kinds:
            del d["fallback_neurons"]
        if d["fallback_rank_mlp"] is None:
            del d["fallback_rank_mlp"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GateSkipConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GateSkipError(f"gate config has unknown keys {sorted(unknown)}: it was written by a newer gateskip")
        return cls(**d)


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's special tokens (BOS, EOS, padding, chat markers such as ``<|im_start|>``), for ``protect_tokens``."""
    return tuple(sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}))


def _whole(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GateSkipError(f"{name}={value!r} is not supported: choose one of {', '.join(allowed)}")


# The recommended gates (``gateskip train``'s defaults, recipes/best.yaml, ``artifacts/smollm2-chat``): rank-16
# low-rank gates on the MLP branches only, each with a neurons fallback (64 of its own neurons and a rank-128 map;
# attention's would be rank-64 low-rank), skipped attention K/V computed, BOS and each prompt's last position
# never skipped. ``GateSkipConfig()`` is the paper's.
RECOMMENDED = GateSkipConfig(gate="lowrank", rank=16, modules=("mlp",), kv="compute", protect_first=1,
                             protect_last=True, fallback="lowrank", fallback_rank=64, fallback_mlp="neurons",
                             fallback_neurons=64, fallback_rank_mlp=128)
