"""``gateskip quantize``: quantize a model's backbone and report weight size and held-out NLL."""

from __future__ import annotations

import torch
from torch import nn

from gateskip.errors import GateSkipError
from gateskip.policies import resolve_policy
from gateskip.quantize import _quanto, describe, quantize, weight_bytes


def quantize_command(model: str | None = None, gates: str | None = None, bits: int = 4, group_size: int = 64,
                     batches: int = 4, seq_len: int = 256, ratio: float = 0.0, threads: int = 0,
                     json: str | None = None, optimizer: str = "minmax") -> dict:
    """Quantize a model's backbone (decoder-layer linears) and report weight size and held-out NLL vs full precision.

    Args:
        model: model alias, hub id or folder (``tiny-<family>`` for a tiny random model); default: the
            gates folder's base model, else smollm2-135m.
        gates: a gates folder to load first (its LoRA / full-backbone deltas are merged before rounding).
        bits: 4 (int4, grouped scales) or 8 (int8, per output channel).
        group_size: input features per int4 scale/shift; must divide every layer's input size.
        batches: held-out batches of 4 x seq-len tokens (``mix`` text, never training text).
        seq_len: tokens per row.
        ratio: with --gates: the paper's skip ratio while measuring (threshold policy when calibrated, else quantile).
        threads: torch CPU threads (0: leave as is).
        json: write the report to this JSON file.
        optimizer: int4 scales/shifts: minmax (round to nearest) or hqq (half-quadratic, slower).
    """
    import json as jsonlib
    from pathlib import Path

    from gateskip.checkpoint import load_gates
    from gateskip.core import gate_state
    from gateskip.files import atomic_write
    from gateskip.loading import base_model_name, load_named

    _quanto()  # fail before loading anything
    if threads:
        torch.set_num_threads(threads)
    if ratio and not gates:
        raise GateSkipError("--ratio needs gates: pass --gates DIR")
    name = base_model_name(model, gates)
    net, tok = load_named(name)
    if gates:
        load_gates(net, gates)
    policy = resolve_policy(None, gates is not None and gate_state(net).loaded.calibration is not None)
    data = _heldout(tok, seq_len, batches)
    before, size_before = _nll(net, data, ratio, policy, "full precision"), weight_bytes(net)
    quantize(net, bits=bits, group_size=group_size, optimizer=optimizer)
    after, size_after = _nll(net, data, ratio, policy, describe(net)), weight_bytes(net)
    report = {"model": name, "gates": gates, "ratio": ratio, "quant": describe(net), "tokens": after["tokens"],
              "full_precision": {**before, "bytes": size_before}, "quantized": {**after, "bytes": size_after},
              "delta_nll": after["nll"] - before["nll"]}
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"{'':<40} {'weights MB':>10} {'decoder linears MB':>18} {'NLL':>7} {'ppl':>8}")
    for label, r, sz in (("full precision", before, size_before), (describe(net), after, size_after)):
        print(f"{label:<40} {mb(sz['total']):10.1f} {mb(sz['linears']):18.1f} "
              f"{r['nll']:7.4f} {r['ppl']:8.2f}")
    print(f"NLL difference: {report['delta_nll']:+.4f} nats/token over {after['tokens']} held-out tokens"
          + (f", ratio {ratio:g} ({policy})" if ratio else ""))
    if json:
        atomic_write(Path(json), lambda p: Path(p).write_text(jsonlib.dumps(report, indent=2)))
    return report


def _heldout(tok, seq_len: int, n: int) -> list[torch.Tensor]:
    from gateskip.data import fixed_batches, load_texts

    if n < 1 or seq_len < 2:
        raise GateSkipError(f"batches={n}, seq_len={seq_len}: need at least 1 batch of 2 tokens")
    return fixed_batches(tok, load_texts("mix", split="heldout"), seq_len, 4, n)


@torch.no_grad()
def _nll(model: nn.Module, batches: list[torch.Tensor], ratio: float, policy: str, label: str) -> dict:
    import contextlib
    import math

    from tqdm import tqdm

    from gateskip.core import skipping

    total, n = 0.0, 0
    for b in tqdm(batches, desc=f"NLL, {label}", unit="batch", leave=False):
        with skipping(model, ratio=ratio, policy=policy) if ratio else contextlib.nullcontext():
            logits = model(b).logits[:, :-1].float()
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                             reduction="sum").item()
        n += b[:, 1:].numel()
    return {"nll": total / n, "ppl": math.exp(total / n), "tokens": n}
