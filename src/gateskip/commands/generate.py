"""Text generation with skipping (``gateskip generate``), as a plain function."""

from __future__ import annotations

import sys

from gateskip.data import encode_prompt
from gateskip.errors import GateSkipError
from gateskip.options import as_list
from gateskip.saved import GENERATION_PROMPT_BOOST


def generate(prompt: str, model: str | None = None, gates: str | None = None, skip: float = 0.0,
             policy: str = "threshold", modules: list[str] = ("attn", "mlp"), kv: str | None = None,
             max_new_tokens: int = 64, chat: bool = True, sample: bool = False, temperature: float = 0.7,
             top_p: float = 0.9, seed: int = 0, allocation: str = "uniform", speculative: bool = False,
             draft_ratio: float = 0.5, k: int = 4, verify: str = "gated", protect_first: int | None = None,
             protect_last: bool | None = None, recheck_stops: bool = True, recheck_below: float = 0.0,
             saved: float | None = None, prompt_boost: float = GENERATION_PROMPT_BOOST) -> str:
    """Generate a completion with token-wise skipping; prints it on stdout and statistics on stderr.

    Args:
        prompt: the text (or user message, with --chat) to continue.
        model: base model; default: the one recorded in --gates, else smollm2-135m.
        gates: a gates folder written by ``gateskip train``.
        skip: fraction of tokens each gated branch skips (0 = none).
        policy: threshold (calibrated, per token), quantile (paper, per call) or random.
        modules: branch kinds that skip: attn, mlp or attn,mlp.
        kv: K/V of skipped attention tokens: copy (from the layer below) or compute.
        max_new_tokens: tokens to generate.
        chat: wrap the prompt in the tokenizer's chat template when it has one.
        sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        seed: random seed for sampling and the random policy.
        allocation: uniform (every branch skips --skip) or global (one calibrated threshold for all
            branches, FLOP-weighted total --skip).
        speculative: lossless self-speculative decoding: draft --k tokens at --draft-ratio, verify them
            with the full model (no skipping) in one pass; the output is the full model's.
        draft_ratio: skip ratio of the speculative draft.
        k: draft tokens per verify pass.
        verify: the full model of --speculative: gated (gates on, nothing skipped) or ungated (gates
            bypassed: the original model for gates trained on a frozen backbone).
        protect_first: never skip the first N tokens (BOS, the attention sink); default: the gates'.
        protect_last: never skip the prompt's last position (its logits choose the first answer token); default:
            the gates'.
        recheck_stops: a step whose top token ends the answer is computed again without skipping (its compute
            counted), so the answer ends only where the model without skipping would end it on the same text.
        recheck_below: the same for steps whose top probability is below this value (0: off).
        saved: a budget in FLOP-weighted compute saved instead of --skip, e.g. 0.25: the skip ratio is steered
            while generating so that this fraction is saved (gates, fallbacks and rechecks counted).
        prompt_boost: with --saved: the prompt aims at this times the budget, the answer makes up the rest.
    """
    from gateskip.core import add_gates
    from gateskip.policies import check_policy, check_ratio

    if not prompt or not prompt.strip():
        raise GateSkipError("empty prompt: give the text to continue, e.g. gateskip generate \"Explain photosynthesis.\"")
    check_ratio(skip)
    check_policy(policy)
    if saved is not None and skip:
        raise GateSkipError("--skip and --saved are two ways to set the budget: give one")
    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens={max_new_tokens} is invalid: use a positive integer")
    if gates is None and (skip > 0 or saved) and policy != "random":
        raise GateSkipError("skipping by importance needs trained gates: pass --gates DIR (or --policy random "
                            "for the untrained baseline)")
    if speculative:
        check_ratio(draft_ratio)
        if skip:
            raise GateSkipError("--skip and --speculative exclude each other: the speculative output is the full "
                                "model's; set the draft's skipping with --draft-ratio")
        if gates is None and policy != "random":
            raise GateSkipError("the speculative draft skips by importance: pass --gates DIR (or --policy random)")
    from gateskip.loading import load_for_inference

    net, tok = load_for_inference(model, gates)
    if gates is None:
        add_gates(net)  # ~open gates: only the random policy or skip 0 make sense without training
    mods = tuple(as_list(modules, str, "--modules"))
    if speculative:
        return _speculative(net, tok, prompt, mods, kv, max_new_tokens, chat, sample, temperature, top_p, seed,
                            allocation, draft_ratio, k, verify, policy)
    text, s, seconds, n_new = complete(net, tok, prompt, skip=skip, policy=policy, modules=mods, kv=kv,
                                       max_new_tokens=max_new_tokens, chat=chat, sample=sample,
                                       temperature=temperature, top_p=top_p, seed=seed, allocation=allocation,
                                       protect_first=protect_first, protect_last=protect_last,
                                       recheck_stops=recheck_stops, recheck_below=recheck_below, saved=saved,
                                       prompt_boost=prompt_boost)
    print(text)
    print(f"[gateskip] {summary_line(s, policy, skip, saved)} rechecked={s['rechecked']} new_tokens={n_new} "
          f"tokens/s={n_new / seconds:.1f}", file=sys.stderr)
    if saved and s["compute_saved"] < saved - 0.05:
        print(f"[gateskip] warning: saved {s['compute_saved']:.1%} of the compute against a budget of {saved:.0%}: one "
              "short request lands only roughly (later ones in a process land closer), and rechecks cost compute "
              "(--recheck-below)", file=sys.stderr)
    if not text.strip():
        print("[gateskip] warning: the answer is empty (the model ended its turn at once): lower --skip, or use "
              "gates that never skip the prompt's last position (--protect-last)", file=sys.stderr)
    return text


def _speculative(net, tok, prompt, mods, kv, max_new_tokens, chat, sample, temperature, top_p, seed, allocation,
                 draft_ratio, k, verify, policy) -> str:
    from gateskip.speculative import speculative_generate

    enc = encode_prompt(tok, prompt, chat, getattr(net.config, "max_position_embeddings", None), max_new_tokens)
    res = speculative_generate(net, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, k=k,
                               draft_ratio=draft_ratio, draft_policy=policy, modules=mods, kv=kv, verify=verify,
                               sample=sample, temperature=temperature if sample else 1.0,
                               top_p=top_p if sample else 1.0, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, seed=seed, allocation=allocation)
    new = res.sequences[0, enc["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    print(text)
    d = res.draft_stats
    print(f"[gateskip] speculative k={k} draft_ratio={draft_ratio:g} verify={verify}: acceptance={res.acceptance_rate:.3f} "
          f"mean_accepted_length={res.mean_accepted_length:.2f} verify_passes={res.cycles} "
          f"draft_compute_saved={d.get('compute_saved', 0.0):.3f} new_tokens={res.new_tokens} "
          f"tokens/s={res.new_tokens / res.seconds:.1f}", file=sys.stderr)
    return text


def summary_line(s: dict, policy: str, skip: float, saved: float | None = None) -> str:
    budget = f"saved={saved:g}" if saved else f"skip={skip:g}"
    return (f"policy={policy} {budget} tokens_skipped={s['tokens_skipped']:.3f} "
            f"compute_saved={s['compute_saved']:.3f} (FLOP-weighted, gates counted; path={s['path']})")


def complete(net, tok, prompt: str, skip: float = 0.0, policy: str = "threshold", modules=("attn", "mlp"),
             kv: str | None = None, max_new_tokens: int = 64, chat: bool = True, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
             allocation: str = "uniform", protect_first: int | None = None,
             protect_last: bool | None = None, recheck_stops: bool = False,
             recheck_below: float = 0.0, saved: float | None = None,
             prompt_boost: float = GENERATION_PROMPT_BOOST) -> tuple[str, dict, float, int]:
    """Generate with an already-loaded gated model (``gateskip.generate``): (completion, stats, seconds, new tokens).
    Without a budget (``skip`` 0, no ``saved``): the gated model at ratio 0, gates' cost included."""
    from gateskip.generation import generate as answer

    out = answer(net, tok, prompt, saved=saved, ratio=skip, policy=policy, max_new_tokens=max_new_tokens, chat=chat,
                 recheck_stops=recheck_stops, sample=sample, temperature=temperature, top_p=top_p, seed=seed,
                 modules=modules, kv=kv, allocation=allocation, protect_first=protect_first, protect_last=protect_last,
                 recheck_below=recheck_below, dense=False, prompt_boost=prompt_boost)
    return out.text, out.stats, out.seconds, out.new_tokens
