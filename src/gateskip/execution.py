"""How a branch call with some tokens skipped is executed: chosen from costs measured once per model and machine.

A branch call where some tokens skip can run three ways, all with the masked path's outputs:
- *none*: every token skips, the module is not called (physical.skip_all); always the cheapest, taken whenever it
  applies;
- *gather*: the kept tokens are gathered and the module runs on them alone (physical.run);
- *blend*: the module runs on every token and the skipped ones get their fallback (the masked path, wrap.py).

Between gather and blend the answer depends on the call's size, the share skipped, the branch kind, the model and the
machine: a decode step of a few rows is bound by reading the weights, which gathering does not reduce, while a long
prompt is bound by arithmetic, and a fallback computed for every row costs the blend more than the gather.

``execution="measured"`` times both ways on this model, on this machine, for every gated kind, at decode sizes (rows
of one new token against a short cache) and prompt sizes, at three shares skipped (about a minute for SmolLM2-135M),
and keeps the table in ``~/.cache/gateskip/execution/`` (``GATESKIP_EXECUTION_CACHE``), keyed by the model's shape,
gates and fallbacks and by the machine (processor, threads, torch). A cached table whose key does not match, or that
cannot be read, is measured again, never trusted. ``execution="cached"`` (the default) uses such a table when one is
there and valid, and physical.py's rule (measured on SmolLM2-135M on a 2-core CPU) otherwise; it never measures, so
nothing stalls: ``gateskip bench --execution measured`` or ``gateskip.execution_costs(model)`` makes the table once.
``execution="rule"``: the rule, whatever is cached.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gateskip.errors import GateSkipError
from gateskip.files import atomic_write
from gateskip.planning import build_plan
from gateskip.record import peek

FORMAT = 1
DECODE_SIZES = (2, 4, 8, 16, 32)  # rows of a decode step (one new token each)
PROMPT_SIZES = (64, 256)  # tokens of a one-row prompt
SHARES = (0.25, 0.5, 0.75)
EXECUTIONS = ("cached", "measured", "rule")


@dataclass(frozen=True)
class ExecutionCosts:
    """Seconds per forward call, blend against gather, by branch kind, call size (tokens) and share skipped.

    ``table[kind]``: rows ``[tokens, share, blend_s, gather_s]``. Measured at the model level (only that kind skips),
    so a row's difference is what the choice changes for all of that kind's branches in one call."""

    key: dict
    table: dict

    def gather_faster(self, kind: str, n_skip: int, n: int) -> bool | None:
        """Is gathering the kept tokens faster than blending for a call of ``n`` tokens, ``n_skip`` skipped?
        None: this kind was not measured (the caller falls back to the rule)."""
        rows = self.table.get(kind)
        if not rows:
            return None
        sizes = sorted({r[0] for r in rows})
        size = min(sizes, key=lambda s: abs(math.log(s) - math.log(max(n, 1))))
        pts = sorted((r[1], r[2] - r[3]) for r in rows if r[0] == size)  # (share, blend - gather)
        return _interpolate(pts, n_skip / max(n, 1)) > 0.0

    def to_json(self) -> dict:
        return {"format": FORMAT, "key": self.key, "table": self.table}


def _interpolate(pts: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through ``pts`` (sorted by x), extended linearly past both ends."""
    if len(pts) == 1:
        return pts[0][1]
    i = 1
    while i < len(pts) - 1 and x > pts[i][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def check_execution(execution) -> None:
    if not isinstance(execution, ExecutionCosts) and execution not in EXECUTIONS:
        raise GateSkipError(f"execution={execution!r} is invalid: use cached (a measured table if this model and "
                            "machine have one, else the rule), measured (timed once, then cached) or rule (built in)")


def resolve_execution(model, execution, path: str) -> ExecutionCosts | None:
    """``skipping(execution=...)``: the table ``path="auto"`` chooses by, None for physical.py's rule."""
    check_execution(execution)
    if isinstance(execution, ExecutionCosts):
        return execution
    if path != "auto" or execution == "rule":
        return None
    return execution_costs(model) if execution == "measured" else cached_costs(model)


def _state(model):
    st = peek(model).state
    if st is None:
        raise GateSkipError("this model has no gates: call gateskip.add_gates(model) or load_gates(model, dir) first")
    return st


def cost_key(model) -> dict:
    """What the costs depend on: the model's shape and dtype, its gates and fallbacks, and the machine."""
    st = _state(model)
    cfg = model.config
    p = next(model.parameters())
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")}
    gates = {"kinds": sorted({b.kind for b in st.branches}), "gate": st.cfg.gate, "rank": st.cfg.rank,
             "fallbacks": sorted({f"{b.kind}:{type(b.fast_fallback).__name__}" for b in st.branches}),
             "attn_implementation": getattr(cfg, "_attn_implementation", None)}
    machine = {"processor": _processor(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__.split("+")[0], "device": p.device.type, "python": platform.python_version()}
    return {"model": shape, "dtype": str(p.dtype), "gates": gates, "machine": machine}


@functools.lru_cache(maxsize=1)
def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(key: dict, root: str | os.PathLike | None = None) -> Path:
    root = Path(root or os.environ.get("GATESKIP_EXECUTION_CACHE") or Path.home() / ".cache" / "gateskip" / "execution")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{digest}.json"


def read_cached(path: Path, key: dict, then: str = "measuring again") -> ExecutionCosts | None:
    """The cached table at ``path`` if it is readable, complete and measured for ``key``; else None (with the reason
    and ``then`` on stderr when a file was there)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        ok = (data.get("format") == FORMAT and data.get("key") == key and isinstance(data.get("table"), dict)
              and all(isinstance(r, list) and len(r) == 4 and all(isinstance(v, (int, float)) for v in r)
                      for rows in data["table"].values() for r in rows))
    except (OSError, ValueError, AttributeError, TypeError):
        ok, data = False, None
    if not ok:
        why = "measured for another model or machine" if isinstance(data, dict) and data.get("key") != key else \
            "unreadable"
        print(f"[gateskip] execution costs {path} are {why}: {then}", file=sys.stderr)
        return None
    return ExecutionCosts(key=data["key"], table=data["table"])


_SEEN: dict = {}  # cached mode: (path, mtime) -> the table read there, so a file is parsed once, not per plan


def cached_costs(model, root: str | os.PathLike | None = None) -> ExecutionCosts | None:
    """This model's measured table on this machine if one is cached and valid, else None (the rule); never measures."""
    key = cost_key(model)
    path = cache_path(key, root)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    if (path, stamp) not in _SEEN:
        _SEEN[(path, stamp)] = read_cached(path, key, "using the built-in rule (gateskip bench --execution measured "
                                                     "measures it again)")
    return _SEEN[(path, stamp)]


def execution_costs(model, root: str | os.PathLike | None = None, repeats: int = 5,
                    decode_sizes=DECODE_SIZES, prompt_sizes=PROMPT_SIZES, shares=SHARES) -> ExecutionCosts:
    """This model's execution costs on this machine: from the cache when valid, else measured (about a minute for
    SmolLM2-135M on 2 CPU cores; progress on stderr) and cached (written, then renamed)."""
    key = cost_key(model)
    path = cache_path(key, root)
    costs = read_cached(path, key)
    if costs is None:
        costs = ExecutionCosts(key=key, table=measure(model, repeats, decode_sizes, prompt_sizes, shares))
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(costs.to_json(), indent=1)))
    return costs


@torch.no_grad()
def measure(model, repeats: int = 5, decode_sizes=DECODE_SIZES, prompt_sizes=PROMPT_SIZES, shares=SHARES) -> dict:
    """``ExecutionCosts.table``: per gated kind, size and share, the fastest of ``repeats`` forward calls with that kind
    skipping that share at random, blend (``path="masked"``) against gather (``path="physical"``), interleaved (the
    fastest: a call slowed by another job on the machine says nothing about the choice)."""
    st = _state(model)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    table = {}
    kinds = sorted({b.kind for b in st.branches})
    total = len(kinds) * (len(decode_sizes) + len(prompt_sizes)) * len(shares)
    done, start = 0, time.perf_counter()
    for kind in kinds:
        rows = []
        for n in (*decode_sizes, *prompt_sizes):
            call = _decode_call(model, n, vocab, gen, device) if n in decode_sizes else \
                _prompt_call(model, n, vocab, gen, device)
            for share in shares:
                times = {"masked": [], "physical": []}
                for r in range(repeats + 1):
                    for path in ("masked", "physical") if r % 2 == 0 else ("physical", "masked"):
                        with _installed(model, st, share, kind, path, r):
                            t0 = time.perf_counter()
                            call()
                            if r > 0:  # the first round warms up
                                times[path].append(time.perf_counter() - t0)
                rows.append([n, share, min(times["masked"]), min(times["physical"])])
                done += 1
                print(f"\r[gateskip] measuring execution costs {done}/{total} ({time.perf_counter() - start:.0f} s)",
                      end="" if done < total else "\n", file=sys.stderr)
        table[kind] = rows
    return table


@contextlib.contextmanager
def _installed(model, st, share: float, kind: str, path: str, seed: int):
    """``skipping(model, ratio=share, policy="random", modules=(kind,), path=path, seed=seed)``, statistics counted as
    in a real run, built here from the plan (gateskip.skipping itself chooses by these costs)."""
    plan, _ = build_plan(model, st, share, "random", (kind,), None, seed, path, "uniform", None, False, None, None,
                         None, None, 0.0, None, False)
    previous, stats = st.plan, st.stats
    st.plan = plan
    st.reset_stats()
    st.call.one_token = False
    try:
        yield
    finally:
        st.plan, st.stats = previous, stats


def _decode_call(model, rows: int, vocab: int, gen, device, cached: int = 16):
    """One decode step of ``rows`` rows against a ``cached``-token cache, the cache cut back after each call."""
    from gateskip.compat import model_cache_arg, output_cache

    ids = torch.randint(0, vocab, (rows, cached), generator=gen).to(device)
    cache = output_cache(model(input_ids=ids, use_cache=True))
    step = {"input_ids": torch.randint(0, vocab, (rows, 1), generator=gen).to(device),
            model_cache_arg(model): cache, "use_cache": True}

    def call():
        model(**step)
        cache.crop(-1)  # the step's token out again
    return call


def _prompt_call(model, tokens: int, vocab: int, gen, device):
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    return lambda: model(input_ids=ids, use_cache=False)
