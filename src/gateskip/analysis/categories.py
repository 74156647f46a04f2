"""Token categories for the interpretability statistics (BOS, punctuation, stop words, ...).

Each token gets exactly one *primary* category, so category means are comparable and add up to
the whole sample. The order below is the precedence: the first rule that matches wins. Byte-level
BPE glues a leading space to the word that follows (" the"), so the rules look at the token text
with surrounding whitespace stripped; whether a token *starts* with whitespace (a word-initial
token) is a separate, overlapping flag (``whitespace_led``), reported as its own group.
"""

from __future__ import annotations

import unicodedata

BOS, SPECIAL, WHITESPACE, PUNCT, NUMBER, STOP, CONTENT, OTHER = (
    "BOS", "special", "whitespace", "punctuation", "number", "stop word", "content word", "other")
CATEGORIES = (BOS, SPECIAL, WHITESPACE, PUNCT, NUMBER, STOP, CONTENT, OTHER)
WHITESPACE_LED = "whitespace-led"  # overlapping group: any token whose text starts with whitespace

# A compact English stop-word list (function words: articles, pronouns, auxiliaries, prepositions,
# conjunctions). Written out here because nltk ships no corpora offline.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves let may might must shall also s t d ll m re ve
""".split())

_NUMBER_SEPARATORS = set(".,_")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")  # punctuation and symbols (+, $, ...)


def categorize(text: str, *, first: bool = False, special: bool = False) -> str:
    """The primary category of one token, given its decoded text.

    Args:
        text: the token's text as the tokenizer decodes it alone (e.g. ``" the"``, ``"\\n"``).
        first: the token is at position 0 of its sequence.
        special: the token is one of the tokenizer's special tokens (BOS, EOS, chat markers).
    """
    if special:
        return BOS if first else SPECIAL
    core = text.strip()
    if not core:
        return WHITESPACE if text else OTHER
    if "\ufffd" in core:
        return OTHER  # a lone byte of a multi-byte character: decoding it alone gives U+FFFD
    if all(_is_punct(c) for c in core):
        return PUNCT
    if any(c.isdigit() for c in core) and all(c.isdigit() or c in _NUMBER_SEPARATORS for c in core):
        return NUMBER
    if core.lower() in STOP_WORDS:
        return STOP
    if any(c.isalpha() for c in core):
        return CONTENT
    return OTHER


def whitespace_led(text: str) -> bool:
    """The token starts with whitespace (a word-initial piece such as ``" cat"`` or ``"\\n"``)."""
    return bool(text) and text[0].isspace()
