"""Fallbacks of the suite's gateskip and random rows: the gates folder's own, or one fitted for the run
(``--fallback KIND``); the label rows carry (``gateskip+lowrank``, ``gateskip+lowrank/linear``)."""

from __future__ import annotations

from gateskip.errors import GateSkipError
from gateskip.fallback import FALLBACK, is_zero, with_rank


def say(bar, msg: str) -> None:
    """A progress line, written through the tqdm bar when there is one (so the bar is not broken)."""
    (getattr(bar, "write", None) or print)(msg)


def install_fallback(net, gates: str, fallback: dict | None, batches, bar) -> dict:
    """The fallback of the gated ``net`` (gates just loaded from ``gates``) for the gateskip/random rows.

    Kind ``zero`` (or None) keeps what the folder holds (a folder saved with a fallback runs with it).
    Another kind: the folder's own when it holds that kind (and, for lowrank, that rank); otherwise
    fitted once on ``batches()`` (plain fit, no plan), announced with its mean R^2 per branch kind.
    Returns the summary recorded in results.json config.
    """
    from gateskip.core import gate_state
    from gateskip.fallback_fit import fit_fallback

    cfg = gate_state(net).cfg
    want = dict(fallback or {})
    kind, rank = want.get("kind") or "zero", int(want.get("rank") or cfg.fallback_rank)
    base = {"requested": kind, "batches": want.get("batches")}
    if is_zero(kind) or (fallback_label(cfg.to_dict()) == kind and (not FALLBACK[kind].uses_rank
                                                                    or cfg.fallback_rank == rank)):
        have = fallback_label(cfg.to_dict())
        if is_zero(kind) and not is_zero(have):
            say(bar, f"[gateskip] the gates folder holds a {cfg.fallback_name()} fallback: "
                      f"gateskip/random rows run with it (named +{have})")
        elif have != "zero":
            say(bar, f"[gateskip] using the {cfg.fallback_name()} fallback stored in {gates}")
        return {**base, "kind": have, "rank": cfg.fallback_rank if "lowrank" in cfg.fallback_kinds else None,
                "source": "gates folder" if have != "zero" else None, "tokens": None, "r2": None, "r2_mean": None}
    fit = fit_fallback(net, batches(), kind=kind, rank=rank)
    means = r2_means(fit["r2"])
    say(bar, f"[gateskip] fitted a {_fb_name(kind, rank)} fallback for every gated branch on {fit['tokens']} "
              f"tokens ({fit['batches']} batches): mean R² attn {_r2(means.get('attn'))}, mlp {_r2(means.get('mlp'))}")
    return {**base, "kind": kind, "rank": fit["rank"], "source": "fitted", "tokens": fit["tokens"],
            "r2": fit["r2"], "r2_mean": means}


def fallback_label(config: dict) -> str:
    """A gates config's fallback as rows name it: ``lowrank``, or ``lowrank/linear`` (attention / MLP kinds)."""
    kind, mlp = config.get("fallback", "zero"), config.get("fallback_mlp")
    return kind if mlp in (None, kind) else f"{kind}/{mlp}"


def _fb_name(kind: str, rank: int) -> str:
    return with_rank(kind, rank)


def _r2(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def r2_means(r2: dict) -> dict:
    """Mean R^2 over the ``attn`` and over the ``mlp`` branches (names ``layers.{i}.{kind}``)."""
    out = {}
    for kind in ("attn", "mlp"):
        vals = [v for k, v in r2.items() if k.endswith("." + kind)]
        if vals:
            out[kind] = sum(vals) / len(vals)
    return out


def check_fallback(kind: str, rank, batches) -> None:
    """The --fallback flags, checked before the model loads."""
    from gateskip.config import FALLBACK_KINDS

    if kind not in FALLBACK_KINDS:
        raise GateSkipError(f"--fallback {kind!r} is not supported: choose one of {', '.join(FALLBACK_KINDS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GateSkipError(f"--fallback-rank {rank!r} is invalid: use a positive whole number")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise GateSkipError(f"--fallback-batches {batches!r} is invalid: use at least 1 batch")
