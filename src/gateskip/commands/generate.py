"""Text generation with skipping (``gateskip generate``), as a plain function."""

from __future__ import annotations

import sys

from gateskip.args import SkipArgs
from gateskip.data import encode_prompt
from gateskip.errors import GateSkipError


def generate(prompt: str, model: str | None = None, gates: str | None = None, ratio: float = 0.0,
             saved: float | None = None, *, skipping: SkipArgs = SkipArgs(), max_new_tokens: int = 64,
             chat: bool = True, sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             speculative: bool = False, draft_ratio: float = 0.5, k: int = 4, verify: str = "gated",
             **flags) -> str:
    """Generate a completion with token-wise skipping; prints it on stdout and statistics on stderr.

    How tokens are chosen is ``skipping`` (gateskip.args.SkipArgs: --policy, --modules, --kv, --recheck-stops ...,
    the same options as ``gateskip eval``'s).

    Args:
        prompt: the text (or user message, with --chat) to continue.
        model: base model; default: the one recorded in --gates, else smollm2-135m.
        gates: a gates folder written by ``gateskip train``.
        ratio: the paper's budget: the fraction of tokens each gated branch skips (0 = none).
        saved: a budget in FLOP-weighted compute saved instead of --ratio, e.g. 0.25: the ratio is steered
            while generating so that this fraction is saved (gates, fallbacks and rechecks counted).
        max_new_tokens: tokens to generate.
        chat: wrap the prompt in the tokenizer's chat template when it has one.
        sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        speculative: lossless self-speculative decoding: draft --k tokens at --draft-ratio, verify them
            with the full model (no skipping) in one pass; the output is the full model's.
        draft_ratio: skip ratio of the speculative draft.
        k: draft tokens per verify pass.
        verify: the full model of --speculative: gated (gates on, nothing skipped) or ungated (gates
            bypassed: the original model for gates trained on a frozen backbone).
    """
    from gateskip.core import add_gates, gate_state
    from gateskip.flags import apply
    from gateskip.policies import check_ratio, needs_trained_gates, resolve_policy

    sk = apply(flags, {"skipping": skipping}, "gateskip generate")["skipping"]
    if not prompt or not prompt.strip():
        raise GateSkipError("empty prompt: give the text to continue, e.g. gateskip generate \"Explain photosynthesis.\"")
    check_ratio(ratio)
    if saved is not None and ratio:
        raise GateSkipError("--ratio and --saved are two ways to set the budget: give one")
    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens={max_new_tokens} is invalid: use a positive integer")
    if gates is None and (ratio > 0 or saved) and needs_trained_gates(sk.policy):
        raise GateSkipError("skipping by importance needs trained gates: pass --gates DIR (or --policy random "
                            "for the untrained baseline)")
    if speculative:
        check_ratio(draft_ratio)
        if ratio:
            raise GateSkipError("--ratio and --speculative exclude each other: the speculative output is the full "
                                "model's; set the draft's skipping with --draft-ratio")
        if gates is None and needs_trained_gates(sk.policy):
            raise GateSkipError("the speculative draft skips by importance: pass --gates DIR (or --policy random)")
    from gateskip.loading import load_for_inference

    net, tok = load_for_inference(model, gates)
    if gates is None:
        add_gates(net)  # ~open gates: only the random policy or ratio 0 make sense without training
    policy = resolve_policy(sk.policy, gate_state(net).loaded.calibration is not None)
    if speculative:
        return _speculative(net, tok, prompt, sk.modules, sk.kv, max_new_tokens, chat, sample, temperature, top_p,
                            sk.seed, sk.allocation, draft_ratio, k, verify, policy)
    text, s, seconds, n_new = complete(net, tok, prompt, ratio=ratio, saved=saved, skipping=sk,
                                       max_new_tokens=max_new_tokens, chat=chat, sample=sample,
                                       temperature=temperature, top_p=top_p)
    print(text)
    print(f"[gateskip] {summary_line(s, policy, ratio, saved)} rechecked={s['rechecked']} new_tokens={n_new} "
          f"tokens/s={n_new / seconds:.1f}", file=sys.stderr)
    if saved and s["compute_saved"] < saved - 0.05:
        print(f"[gateskip] warning: saved {s['compute_saved']:.1%} of the compute against a budget of {saved:.0%}: one "
              "short request lands only roughly (later ones in a process land closer), and rechecks cost compute "
              "(--recheck-below)", file=sys.stderr)
    if not text.strip():
        print("[gateskip] warning: the answer is empty (the model ended its turn at once): lower --ratio or --saved, or use "
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


def summary_line(s: dict, policy: str, ratio: float, saved: float | None = None) -> str:
    budget = f"saved={saved:g}" if saved else f"ratio={ratio:g}"
    return (f"policy={policy} {budget} tokens_skipped={s['tokens_skipped']:.3f} "
            f"compute_saved={s['compute_saved']:.3f} (FLOP-weighted, gates counted; path={s['path']})")


def complete(net, tok, prompt: str, ratio: float = 0.0, saved: float | None = None, skipping: SkipArgs = SkipArgs(),
             max_new_tokens: int = 64, chat: bool = True, sample: bool = False, temperature: float = 0.7,
             top_p: float = 0.9) -> tuple[str, dict, float, int]:
    """Generate with an already-loaded gated model (``gateskip.generate``): (completion, stats, seconds, new tokens).
    Without a budget (``ratio`` 0, no ``saved``): the gated model at ratio 0, gates' cost included."""
    from gateskip.generation import generate as answer

    out = answer(net, tok, prompt, saved=saved, ratio=ratio, max_new_tokens=max_new_tokens, chat=chat,
                 recheck_stops=skipping.recheck_stops, sample=sample, temperature=temperature, top_p=top_p,
                 dense=False, prompt_boost=skipping.prompt_boost, **skipping.skipping())
    return out.text, out.stats, out.seconds, out.new_tokens
