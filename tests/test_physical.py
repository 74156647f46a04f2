"""The physical path (skipped tokens not computed) gives the masked path's results, on every family."""

import pytest
import torch
from conftest import FAMILIES, VOCAB, left_padded, path_grads, positions

import gateskip
from gateskip import GateSkipConfig
from gateskip.compat import model_cache_arg, output_cache
from gateskip.models import tiny_model

DIVERSE = GateSkipConfig(init_std=0.3, init_bias=0.0)
TOL = 1e-4


def _calibrated(family, cfg=DIVERSE):
    m = gateskip.add_gates(tiny_model(family), cfg)
    g = torch.Generator().manual_seed(1)
    gateskip.calibrate(m, [torch.randint(1, VOCAB, (4, 32), generator=g) for _ in range(3)], ratio=0.3)
    return m


def _run_both(m, fn, **skip_kw):
    """fn(m) under the masked and the physical path; returns both results and the physical stats."""
    out = {}
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, path=path, **skip_kw):
            out[path] = fn(m)
            if path == "physical":
                s = gateskip.stats(m)
    return out["masked"], out["physical"], s


SYNC_FREE = {"policy": "quantile", "sync_free": True}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", ["copy", "compute"])
@pytest.mark.parametrize("how", [{"policy": "threshold"}, SYNC_FREE], ids=["threshold", "sync_free"])
def test_physical_equals_masked(family, kv, how):
    """Prefill (left-padded batch and an unpadded row: implicit mask), then cached decode in generate()."""
    m = _calibrated(family)
    ids, mask = left_padded([20, 11, 17])  # longer than the tiny Gemma sliding window (16)

    def prefill(m):
        padded = m(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        return padded, m(input_ids=ids[:1], use_cache=False).logits

    (pm, um), (pp, up), s = _run_both(m, prefill, ratio=0.4, kv=kv, **how)
    valid = mask.bool()
    assert (pm - pp)[valid].abs().max() < TOL
    assert (um - up).abs().max() < TOL
    assert s["path"] == "physical" and s["tokens_skipped"] > 0.2

    def generate(m):
        return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)

    gm, gp, s = _run_both(m, generate, ratio=0.4, kv=kv, **how)
    assert torch.equal(gm.sequences, gp.sequences)
    assert max((a - b).abs().max() for a, b in zip(gm.logits, gp.logits)) < TOL
    assert s["path_calls"]["physical"] > 0 and s["path_calls"]["masked"] == 0
    if how is SYNC_FREE:
        assert s["sync_calls"] == 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_decode_with_rows_skipping_everything(family):
    """Random skipping at decode batch 4: some rows skip a branch entirely and leave the call."""
    m = _calibrated(family)
    ids, mask = left_padded([9, 5, 7, 8], seed=3)

    def generate(m):
        return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)

    for kv in ("copy", "compute"):
        gm, gp, _ = _run_both(m, generate, ratio=0.5, policy="random", kv=kv, seed=4)
        assert torch.equal(gm.sequences, gp.sequences)
        assert max((a - b).abs().max() for a, b in zip(gm.logits, gp.logits)) < TOL


@pytest.mark.parametrize("kv", ["copy", "compute"])
def test_module_skipped_at_decode_batch1_is_not_called(kv):
    m = _calibrated("qwen3")
    layer = m.model.layers[1]
    calls = {"attn": 0, "mlp": 0}
    for kind, mod in (("attn", layer.self_attn.module), ("mlp", layer.mlp.module)):
        mod.register_forward_hook(lambda *_a, k=kind: calls.__setitem__(k, calls[k] + 1))
    ids = torch.randint(1, VOCAB, (1, 10))
    ratio = {"attn": 0.3, "mlp": 0.3, "layers.1.attn": 1.0, "layers.1.mlp": 1.0}

    def prefill_then_decode(m):
        out = m(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        calls.update(attn=0, mlp=0)
        cache = output_cache(out)
        step = m(input_ids=nxt, **{model_cache_arg(m): cache}, use_cache=True)
        return step.logits, cache.layers[1].keys.shape[2], dict(calls)

    (lm, nm, _), (lp, n_keys, c), _ = _run_both(m, prefill_then_decode, ratio=ratio, policy="threshold", kv=kv)
    assert c == {"attn": 0, "mlp": 0}
    assert n_keys == 11  # the skipped token's K/V still went into the cache
    assert (lm - lp).abs().max() < TOL


def test_path_choice_and_stats():
    m = _calibrated("llama")
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad(), gateskip.skipping(m, ratio=0.3, policy="quantile"):
        m(input_ids=ids)
        assert gateskip.stats(m)["path"] == "physical"
    with gateskip.skipping(m, ratio=0.3, policy="quantile"):  # gradients needed (training): masked by default
        m(input_ids=ids)
        assert gateskip.stats(m)["path"] == "masked"
    with torch.no_grad(), gateskip.skipping(m, ratio=0.0):
        m(input_ids=ids)
        assert gateskip.stats(m)["path_calls"] == {"physical": 0, "masked": 0, "dense": 6}
    with pytest.raises(gateskip.GateSkipError, match="path="):
        with gateskip.skipping(m, ratio=0.3, path="fast"):
            pass


def test_physical_backward_matches_masked():
    """The physical path is differentiable too (gather/scatter), with the masked path's gradients."""
    m = _calibrated("mistral")
    ids = torch.randint(1, VOCAB, (2, 12))
    grads = path_grads(m, ids, lambda m: m.model.layers[1].self_attn.module.q_proj.weight.grad.clone())
    assert (grads["masked"] - grads["physical"]).abs().max() < TOL


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's contents back to the host: each is a sync on GPU."""

    # .item() / int() / bool() reach _local_scalar_dense; the others size their output from the data
    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
             "aten::_unique2", "aten::repeat_interleave"}
    BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}  # x[mask]

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.READS:
            self.n += 1
        elif name in self.BOOL_INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv", ["copy", "compute"])
def test_sync_free_quantile_path_reads_nothing_back_per_branch(kv):
    """GPU contract, checked on CPU at the op level: under the quantile policy with ``sync_free`` the
    physical path adds at most one host read per forward call (the valid-token count) to what the
    model itself does, however many branches skip; its outputs equal the masked path's."""
    m = _calibrated("llama")
    ids, mask = left_padded([20, 11, 17])

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        step = m(input_ids=nxt, attention_mask=mask2, position_ids=positions(mask2)[:, -1:], use_cache=True,
                 **{model_cache_arg(m): cache})
        return out.logits, step.logits

    def reads(**kw):
        with torch.no_grad(), gateskip.skipping(m, path="physical", **kw):
            with _HostReads() as h:
                result = run(m)
            return h.n, result, gateskip.stats(m)

    base, _, _ = reads(ratio=0.0)  # gated, nothing skips: the model's own reads
    n_sync, (pre, dec), s = reads(ratio=0.5, policy="quantile", kv=kv, sync_free=True)
    assert s["path_calls"]["physical"] == 2 * len(m.model.layers) * 2 and s["sync_calls"] == 0
    assert n_sync <= base + 2  # one eligible-token count per forward call
    n_read, _, s_read = reads(ratio=0.5, policy="quantile", kv=kv, sync_free=False)
    assert n_read >= base + len(m.model.layers) * 2  # the exact-size path reads per branch (free on CPU)
    for policy in ("threshold", "random"):  # data-dependent counts: under sync_free, masked rather than read
        n_dd, (dd_pre, dd_dec), s_dd = reads(ratio=0.5, policy=policy, kv=kv, sync_free=True)
        assert s_dd["sync_calls"] == 0 and s_dd["path_calls"]["physical"] == 0 and s_dd["tokens_skipped"] > 0.3
        assert n_dd <= base + 2
        with torch.no_grad(), gateskip.skipping(m, path="masked", ratio=0.5, policy=policy, kv=kv):
            dd_ref = run(m)
        assert (dd_pre - dd_ref[0])[mask.bool()].abs().max() < TOL and (dd_dec - dd_ref[1]).abs().max() < TOL
        n_read, _, s_read = reads(ratio=0.5, policy=policy, kv=kv, sync_free=False)
        assert s_read["sync_calls"] >= len(m.model.layers) * 2  # without sync_free they are read, and reported
    with torch.no_grad(), gateskip.skipping(m, path="masked", ratio=0.5, policy="quantile", kv=kv):
        ref_pre, ref_dec = run(m)
    valid = mask.bool()
    assert (pre - ref_pre)[valid].abs().max() < TOL
    assert (dec - ref_dec).abs().max() < TOL


def test_sync_free_decode_at_batch_one_reads_nothing_back_per_branch():
    """Decode at batch 1 under thresholds decides each branch on the host (a read per branch: a GPU sync).
    Under ``sync_free`` it must not: the branches run masked, with the masked path's outputs."""
    m = _calibrated("llama")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))

    def steps(**kw):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="threshold", **kw):
            out = m(input_ids=ids, use_cache=True)
            cache, nxt, logits = output_cache(out), out.logits[:, -1:].argmax(-1), []
            with _HostReads() as h:
                for _ in range(4):
                    out = m(input_ids=nxt, use_cache=True, **{model_cache_arg(m): cache})
                    cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
                    logits.append(out.logits)
            return h.n, torch.cat(logits), gateskip.stats(m)

    n_free, free, s_free = steps(sync_free=True)
    n_host, host, s_host = steps(sync_free=False)
    _, masked, _ = steps(path="masked", sync_free=True)
    branches = 2 * len(m.model.layers)
    assert n_host >= 4 * branches and s_host["path_calls"]["physical"] > 0  # one read per branch and step
    assert n_free <= n_host - 4 * branches + 4 * 2 and s_free["sync_calls"] == 0  # at most per-call reads
    assert s_free["path_calls"]["physical"] == 0 and s_free["tokens_skipped"] > 0.2
    assert (free - masked).abs().max() < TOL and (host - masked).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_on_mlp_branches_only(family):
    """A model gated on its MLP branches alone (GateSkipConfig(modules=("mlp",)), what `gateskip train --modules
    mlp` builds): prefill and cached decode on the physical path equal the masked path; attention never skips."""
    m = _calibrated(family, GateSkipConfig(init_std=0.3, init_bias=0.0, modules=("mlp",)))
    ids, mask = left_padded([20, 11, 17])

    def generate(m):
        return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)

    gm, gp, s = _run_both(m, generate, ratio=0.4, policy="threshold")
    assert torch.equal(gm.sequences, gp.sequences)
    assert max((a - b).abs().max() for a, b in zip(gm.logits, gp.logits)) < TOL
    assert s["path_calls"]["physical"] > 0 and s["mlp_skipped"] > 0.2
    assert s["attn_skipped"] == 0 and set(s["per_module"]) == {f"layers.{i}.mlp" for i in range(len(s["per_module"]))}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_prompt_into_an_empty_cache_object_takes_the_physical_path(family):
    """``DynamicCache()`` passed in by the caller has no layers until the first call fills them: the physical
    attention's mask is built before its layer exists (once an IndexError) and must equal the masked path's."""
    from transformers import DynamicCache

    m = _calibrated(family)
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    out, paths = {}, {}
    for path in ("masked", "physical"):
        with torch.no_grad(), gateskip.skipping(m, ratio=0.5, policy="quantile", path=path):
            res = m(input_ids=ids, use_cache=True, **{model_cache_arg(m): DynamicCache()})
            out[path] = (res.logits, output_cache(res).layers[-1].keys)
            paths[path] = gateskip.stats(m)["path"]
    assert paths == {"masked": "masked", "physical": "physical"}
    for a, b in zip(out["masked"], out["physical"]):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
