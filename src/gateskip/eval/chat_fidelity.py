"""Chat fidelity: what a user reads when a skipping model answers chat requests.

Held-out chat requests (gateskip.chat: offline questions phrased as requests, in the model's chat template, never
fitted, calibrated or healed on) are answered greedily by the original model (``dense``: the base model, any
backbone change of the gates folder undone, gates bypassed) and by every setting. Per setting, over the prompts:

- ``empty``: the answer has no visible text (it ends at once, or writes only whitespace or special tokens);
- ``early``: it ends (an end token) with fewer than half the dense answer's tokens, the dense answer having at
  least ``EARLY_MIN`` tokens; ``empty_or_early`` is either;
- ``overlap``: token-level LCS F1 with the dense answer (ROUGE-L F1; 1 for identical answers, 0 when one is empty
  and the other not);
- ``nll``: the original model's mean negative log-likelihood of the answer's tokens (its end token included when
  it ended), per prompt, then averaged; ``nll_ratio`` divides by the dense answers' own;
- ``length_ratio``: answer tokens over the dense answers' tokens (totals);
- ``first_agree``: the first generated token (an end token included) is dense's;
- ``compute_saved`` / ``tokens_skipped``: FLOP-weighted saving and the paper's share of skipped tokens over the
  whole generation, prefill and decode, of the real answers only (an ended row is masked out of later steps).

Rows are compared at matched compute: each method's per-prompt values are interpolated between its rows at fixed
levels of compute saved (never extrapolated), and two methods' differences get a paired bootstrap interval over
prompts. ``gateskip`` is bracketed by ``random`` (same gates folder, fallbacks and rules; random tokens) below and
``oracle`` (it computes each branch and skips the tokens whose output changes least) above.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gateskip.chat import chat_requests, greedy_answers, pad_id, stop_ids, template_ids
from gateskip.errors import GateSkipError

EARLY_MIN = 8  # a dense answer this long or longer can be cut short ("early")
LEVELS = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
METRICS = ("empty", "early", "empty_or_early", "overlap", "nll", "first_agree")


def lcs_f1(a: list[int], b: list[int]) -> float:
    """Token-level longest-common-subsequence F1 (ROUGE-L F1) of two token lists; two empty lists score 1."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def is_empty(tok, tokens: list[int]) -> bool:
    """No visible text: nothing, or only whitespace and special tokens."""
    return not tok.decode(tokens, skip_special_tokens=True).strip()


@dataclass
class Setting:
    """One row: a method name, the ``skipping`` arguments (None: the original model) and its budget label."""

    method: str
    budget: float
    skip: dict | None = None
    recheck_stops: bool = False  # the run's stop tokens are also ``skipping``'s recheck_tokens (recheck.py)

    def skip_args(self, stops: list[int]) -> dict:
        return {**self.skip, "recheck_tokens": stops} if self.recheck_stops else dict(self.skip)


@dataclass
class Row:
    method: str
    budget: float
    compute_saved: float
    tokens_skipped: float
    seconds: float
    new_tokens: int
    summary: dict
    per_prompt: dict = field(default_factory=dict)  # metric -> list over prompts
    answers: list[str] = field(default_factory=list)


@torch.no_grad()
def answer_nll(net, prompts: list[list[int]], answers: list[list[int]], stopped: list[bool], eos: int,
               batch: int = 16) -> list[float]:
    """Per prompt: mean NLL of the answer tokens (and its end token when it ended) under ``net`` as it is."""
    out = []
    dev = next(net.parameters()).device
    for s in range(0, len(prompts), batch):
        seqs, spans = [], []
        for p, a, e in zip(prompts[s:s + batch], answers[s:s + batch], stopped[s:s + batch]):
            target = a + ([eos] if e else [])
            seqs.append(p + target)
            spans.append((len(p), len(target)))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, q in enumerate(seqs):  # right-padded: every row starts at position 0
            ids[r, :len(q)] = torch.tensor(q)
            mask[r, :len(q)] = 1
        logits = net(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        logp = F.log_softmax(logits[:, :-1], -1)
        for r, (start, n) in enumerate(spans):
            if n == 0:
                out.append(float("nan"))
                continue
            tgt = ids[r, start:start + n].to(dev)
            lp = logp[r, start - 1:start - 1 + n].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            out.append(float(-lp.mean()))
    return out


def _summary(per: dict, dense_nll: float, lengths: list[int], dense_lengths: list[int]) -> dict:
    mean = {k: sum(v) / len(v) for k, v in per.items()}
    mean["nll_ratio"] = mean["nll"] / dense_nll if dense_nll > 0 else float("nan")
    mean["length_ratio"] = sum(lengths) / max(1, sum(dense_lengths))
    return mean


def run(net, tok, settings: list[Setting], n: int = 200, max_new_tokens: int = 48, batch: int = 16,
        log: Callable[[str], None] | None = None) -> dict:
    """Answer ``n`` held-out chat requests with every setting; rows with their summaries and per-prompt values."""
    from gateskip.core import original_backbone, skipping, stats

    if not settings or settings[0].skip is not None:
        raise GateSkipError("chat fidelity needs the original model's row first: Setting('dense', 0.0, None)")
    requests = chat_requests("heldout", n)
    prompts = [template_ids(tok, r) for r in requests]
    stops, pad, eos = stop_ids(tok), pad_id(tok), tok.eos_token_id if tok.eos_token_id is not None else stop_ids(tok)[0]
    rows: list[Row] = []
    dense = None
    for st in settings:
        t0 = time.perf_counter()
        if st.skip is None:
            with original_backbone(net):
                ans = greedy_answers(net, prompts, max_new_tokens, stops, pad, batch=batch)
            s = {}
        else:
            with skipping(net, **st.skip_args(stops)):
                ans = greedy_answers(net, prompts, max_new_tokens, stops, pad, batch=batch)
                s = stats(net)
        with original_backbone(net):
            nll = answer_nll(net, prompts, ans.tokens, ans.stopped, eos)
        if dense is None:
            dense = ans
        empty = [float(is_empty(tok, a)) for a in ans.tokens]
        early = [float(e and not m and len(d) >= EARLY_MIN and len(a) < len(d) / 2)
                 for a, d, e, m in zip(ans.tokens, dense.tokens, ans.stopped, empty)]
        first = [float((a[:1] or [eos]) == (d[:1] or [eos])) for a, d in zip(ans.tokens, dense.tokens)]
        per = {"empty": empty, "early": early, "empty_or_early": [max(a, b) for a, b in zip(empty, early)],
               "overlap": [lcs_f1(a, d) for a, d in zip(ans.tokens, dense.tokens)], "nll": nll, "first_agree": first}
        dense_nll = sum(rows[0].per_prompt["nll"]) / n if rows else sum(nll) / n
        row = Row(st.method, st.budget, float(s.get("compute_saved", 0.0)), float(s.get("tokens_skipped", 0.0)),
                  time.perf_counter() - t0, sum(map(len, ans.tokens)),
                  _summary(per, dense_nll, [len(a) for a in ans.tokens], [len(d) for d in dense.tokens]), per,
                  [tok.decode(a, skip_special_tokens=True) for a in ans.tokens])
        rows.append(row)
        if log is not None:
            m = row.summary
            log(f"{st.method} {st.budget:g}: saved {row.compute_saved:.1%}, empty/early {m['empty_or_early']:.1%}, "
                f"overlap {m['overlap']:.3f}, NLL x{m['nll_ratio']:.3f}, first token {m['first_agree']:.1%} "
                f"({row.seconds:.0f} s)")
    return {"prompts": n, "max_new_tokens": max_new_tokens, "requests": requests, "rows": [asdict(r) for r in rows]}


AT_LEVEL = 0.005  # a row this close to a level of compute saved counts as measured at it


def matched(rows: list[dict], method: str, level: float, metric: str) -> list[float] | None:
    """Per prompt, ``metric`` of ``method`` interpolated to ``level`` of compute saved between its two bracketing
    rows, or taken from its row within ``AT_LEVEL`` of it (a ``--saved`` row landing at 24.8% for 25%); None
    when neither holds (never extrapolated further)."""
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["compute_saved"])
    for lo, hi in zip(mine, mine[1:]):
        a, b = lo["compute_saved"], hi["compute_saved"]
        if a <= level <= b and b > a:
            w = (level - a) / (b - a)
            return [(1 - w) * x + w * y for x, y in zip(lo["per_prompt"][metric], hi["per_prompt"][metric])]
    near = min(mine, key=lambda r: abs(r["compute_saved"] - level), default=None)
    if near is not None and abs(near["compute_saved"] - level) <= AT_LEVEL:
        return list(near["per_prompt"][metric])
    return None


def paired(x: list[float], y: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of x - y and a 95% percentile bootstrap interval over prompts."""
    d = torch.tensor(x, dtype=torch.float64) - torch.tensor(y, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (iters, len(d)), generator=g)
    means = d[idx].mean(1)
    return float(d.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def merge(res: dict, others: list[dict], labels: list[str]) -> dict:
    """``res`` with the skipping rows of other chat runs (``--compare-with``) added, each method named
    ``"method (label)"``: runs of the same requests whose dense answers are the same, so rows pair prompt by prompt."""
    rows = list(res["rows"])
    for other, label in zip(others, labels, strict=True):
        if other["requests"] != res["requests"] or other["max_new_tokens"] != res["max_new_tokens"]:
            raise GateSkipError(f"--compare-with {label}: another set of requests or answer length; run both with the "
                                "same --limit and --fidelity-tokens")
        if other["rows"][0]["answers"] != rows[0]["answers"]:
            raise GateSkipError(f"--compare-with {label}: its dense answers differ from this run's (another model?)")
        rows += [{**r, "method": f"{r['method']} ({label})"} for r in other["rows"][1:]]
    return {**res, "rows": rows}


PAIRED = ("empty_or_early", "overlap", "nll")  # the metrics paired against --compare-with runs


def _paired_cells(mine: list, theirs: list) -> list[str]:
    """``paired`` of each metric (lists per prompt) as table cells; [] when a side is missing."""
    if any(v is None for v in (*mine, *theirs)):
        return []
    return [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in (paired(a, b) for a, b in zip(mine, theirs))]


def report(res: dict, reference: str = "gateskip") -> str:
    rows = res["rows"]
    dense = rows[0]["summary"]
    lines = [f"# Chat fidelity: {res['prompts']} held-out chat requests, greedy, at most {res['max_new_tokens']} new tokens",
             "", f"Dense (the original model): empty or early-stopped {dense['empty_or_early']:.1%}, NLL of its own "
             f"answers {dense['nll']:.3f}.", "",
             "| method | budget | compute saved | tokens skipped | empty | early | overlap | NLL (x dense) | "
             "length ratio | first token | new tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["summary"]
        lines.append(f"| {r['method']} | {r['budget']:g} | {r['compute_saved']:.1%} | {r['tokens_skipped']:.1%} | "
                     f"{m['empty']:.1%} | {m['early']:.1%} | {m['overlap']:.3f} | {m['nll']:.3f} (x{m['nll_ratio']:.2f})"
                     f" | {m['length_ratio']:.2f} | {m['first_agree']:.1%} | {r['new_tokens'] / max(r['seconds'], 1e-9):.1f} |")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    lines += ["", "## At matched compute saved while generating (per prompt, interpolated between a method's rows)", "",
              "| level | method | empty or early | overlap | NLL (x dense) |", "|---|---|---|---|---|"]
    dense_nll = dense["nll"]
    for level in LEVELS:
        for m in methods:
            vals = {k: matched(rows, m, level, k) for k in ("empty_or_early", "overlap", "nll")}
            if vals["overlap"] is None:
                continue
            mean = {k: sum(v) / len(v) for k, v in vals.items()}
            lines.append(f"| {level:.0%} | {m} | {mean['empty_or_early']:.1%} | {mean['overlap']:.3f} | "
                         f"{mean['nll']:.3f} (x{mean['nll'] / dense_nll:.2f}) |")
    if reference in methods:
        lines += ["", f"## {reference} against its floor (random) and ceiling (oracle), paired over prompts", "",
                  "| level | metric | minus random [95%] | minus oracle [95%] | share of the random-to-oracle gap closed |",
                  "|---|---|---|---|---|"]
        for level in LEVELS:
            for metric in ("overlap", "nll"):
                me = matched(rows, reference, level, metric)
                if me is None:
                    continue
                cells = []
                other_means = {}
                for other in ("random", "oracle"):
                    o = matched(rows, other, level, metric) if other in methods else None
                    if o is None:
                        cells.append("-")
                        continue
                    d, lo, hi = paired(me, o)
                    other_means[other] = sum(o) / len(o)
                    cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                gap = "-"
                if len(other_means) == 2 and other_means["oracle"] != other_means["random"]:
                    gap = f"{(sum(me) / len(me) - other_means['random']) / (other_means['oracle'] - other_means['random']):.0%}"
                lines.append(f"| {level:.0%} | {metric} | {cells[0]} | {cells[1]} | {gap} |")
    compared = [m for m in methods if m.startswith(f"{reference} (")]
    if reference in methods and compared:
        lines += ["", f"## {reference} against the compared runs (--compare-with), paired over prompts", "",
                  "| level | compared with | empty or early [95%] | overlap [95%] | NLL [95%] |", "|---|---|---|---|---|"]
        at_level = set()
        for level in LEVELS:
            for other in compared:
                cells = _paired_cells([matched(rows, reference, level, k) for k in PAIRED],
                                      [matched(rows, other, level, k) for k in PAIRED])
                if cells:
                    at_level.add((other, level))
                    lines.append(f"| {level:.0%} | {other} | {' | '.join(cells)} |")
        # rows that land off every level and bracket none (one --saved row each): paired at the budget both asked for
        for other in compared:
            for mine in (r for r in rows if r["method"] == reference):
                theirs = next((r for r in rows if r["method"] == other and r["budget"] == mine["budget"]), None)
                nearest = min(LEVELS, key=lambda v: abs(v - mine["compute_saved"]))
                if theirs is None or (other, nearest) in at_level:
                    continue
                cells = _paired_cells([mine["per_prompt"][k] for k in PAIRED], [theirs["per_prompt"][k] for k in PAIRED])
                lines.append(f"| budget {mine['budget']:g} ({mine['compute_saved']:.1%} / {theirs['compute_saved']:.1%}"
                             f" saved) | {other} | {' | '.join(cells)} |")
    lines += ["", "## Sample answers (first three requests)", ""]
    for i in range(min(3, res["prompts"])):
        lines.append(f"**{res['requests'][i]}**")
        for r in rows:
            lines.append(f"- {r['method']} {r['budget']:g} ({r['compute_saved']:.0%} saved): "
                         f"{(r['answers'][i].strip() or '(empty)')[:200]!r}")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, title) in zip(axes, (("overlap", "overlap with the dense answer (LCS F1)"),
                                          ("nll_ratio", "original model's NLL, x dense"),
                                          ("empty_or_early", "empty or early-stopped"))):
        for m in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["compute_saved"])
            ax.plot([100 * r["compute_saved"] for r in mine], [r["summary"][metric] for r in mine], "o-", label=m)
        ax.set_xlabel("compute saved while generating (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(res: dict, out: str | Path) -> Path:
    """OUT/chat.json, chat.md and chat.png."""
    from gateskip.eval.outputs import write_run

    return write_run(out, "chat", res, report(res), plot)
