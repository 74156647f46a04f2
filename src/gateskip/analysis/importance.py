"""Per-token importances of every gated branch, read from one dense forward pass.

The model runs with ratio 0 (nothing skipped) while the gate state logs each branch's gate values
(``collect``); a token's importance for a branch is the mean gate over hidden units, exactly the
key the skip policies rank by (``gateskip.gates.importance``).
"""

from __future__ import annotations

import torch

from gateskip.core import gate_state, skipping
from gateskip.errors import GateSkipError
from gateskip.gates import importance
from gateskip.taps import check_not_bypassed, logging_gates

# Whitespace made visible in token labels: a leading space, a newline or a tab would otherwise be
# invisible (or break the layout) in a plot or a page.
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def visible(text: str) -> str:
    """Token text with whitespace and control characters shown as symbols (``" a\\n"`` -> ``"␣a↵"``)."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def token_texts(tok, ids: list[int]) -> list[str]:
    """Each token's own text as the tokenizer decodes it alone (special tokens by their names)."""
    return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def token_labels(tok, ids: list[int]) -> list[str]:
    """Readable labels for plots and pages: the token text with whitespace made visible.

    A byte-level token that is only part of a multi-byte character decodes to U+FFFD; such tokens
    are labelled by the tokenizer's raw token string instead, so neighbouring labels stay distinct.
    """
    raw = tok.convert_ids_to_tokens(ids)
    return [visible(r if ("\ufffd" in t and r) else t) for t, r in zip(token_texts(tok, ids), raw)]


def encode(tok, text: str, chat: bool = False, add_bos: bool = True) -> torch.Tensor:
    """``input_ids [1, T]`` of ``text``: the chat template, or plain text with BOS first.

    Gates are trained on rows that start with BOS (``gateskip.data.pack``), so plain text gets a
    BOS too unless the tokenizer already added one: otherwise the first word would play BOS.
    """
    from gateskip.data import encode_prompt

    if not text or not text.strip():
        raise GateSkipError("empty text: give the text to inspect, e.g. gateskip inspect --text \"The cat sat.\"")
    templated = chat and bool(getattr(tok, "chat_template", None))
    ids = encode_prompt(tok, text, templated, None, 0)["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    if add_bos and not templated and bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
        ids = torch.cat([torch.tensor([[bos]], dtype=ids.dtype), ids], dim=1)
    return ids


@torch.no_grad()
def branch_importances(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Importances ``[B, T, branches]`` (branches in execution order) from one dense forward."""
    st = gate_state(model)
    check_not_bypassed(st, "read importances")
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    with logging_gates(model) as gate_log, skipping(model, ratio=0.0):  # a dense run, whatever the caller's context
        model(**inputs, use_cache=False)
    log = gate_log.entries
    if len(log) != len(st.branches):
        raise GateSkipError(f"logged {len(log)} gate calls for {len(st.branches)} branches: "
                            "the model did not run every gated branch once")
    return torch.stack([importance(g.float()) for g, _ in log], dim=-1).cpu()


def importances(model, tok, text: str, chat: bool = False, add_bos: bool = True
                ) -> tuple[torch.Tensor, list[str], list[str]]:
    """Importance of every token for every gated branch, for notebooks.

    Args:
        model: a gated model (``add_gates`` or ``load_gates`` applied).
        tok: its tokenizer.
        text: the text to read.
        chat: wrap ``text`` as a user message in the tokenizer's chat template.
        add_bos: put BOS first when plain text has none (as in training).

    Returns:
        ``(imp, tokens, branches)``: ``imp`` a float tensor ``[tokens, branches]`` with values in
        (0, 1); ``tokens`` each token's text; ``branches`` names such as ``layers.3.attn``.
    """
    ids = encode(tok, text, chat=chat, add_bos=add_bos)
    imp = branch_importances(model, ids)[0]
    names = [b.name for b in gate_state(model).branches]
    return imp, token_texts(tok, ids[0].tolist()), names
