"""Document preparation for the offline task YAMLs (referenced as ``!function docs.<name>``).

lm-eval loads this file by path from the folder of the resolved YAMLs, so it imports nothing
relative. BoolQ and LAMBADA keep only held-out items (``gateskip.data.is_heldout`` on the passage /
context): gate training reads those texts, evaluation must not.
"""

import re

from gateskip.data import is_heldout

MMLU_SHUFFLE_SEED = 1234


def _clean_hellaswag(text: str) -> str:
    # " [title]" and other bracketed markers are WikiHow artifacts (as lm-eval's own task does).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean_hellaswag(doc["activity_label"] + ": " + ctx),
                "choices": [_clean_hellaswag(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def winogrande_text(doc):  # partial scoring: the context varies, the continuation is shared
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choices(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + opt for opt in (doc["option1"], doc["option2"])]


def boolq(dataset):
    held = dataset.filter(lambda d: is_heldout(d["passage"]))
    return held.map(lambda d: {"label": int(str(d["answer"]).lower() == "true")})


def mmlu(dataset):
    dataset = dataset.map(lambda d: {"subject_name": d["subject"].replace("_", " ")})
    return dataset.shuffle(seed=MMLU_SHUFFLE_SEED).flatten_indices()


def lambada(dataset):
    flat = dataset.map(lambda d: {"context": d["request"]["context"],
                                  "continuation": d["request"]["continuation"],
                                  "target": d["request"]["continuation"].strip()},
                       remove_columns=dataset.column_names)
    return flat.filter(lambda d: is_heldout(d["context"]))


def lambada_gen_results(doc, results):
    words = results[0].strip().split()
    first = re.sub(r"[^\w'-]+$", "", words[0]) if words else ""
    return {"acc": float(first == doc["target"])}


def gsm8k(dataset):
    return dataset.map(lambda d: {"question": d["doc"]["question"], "answer": d["doc"]["answer"]},
                       remove_columns=dataset.column_names)


def copa_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_choices(doc):
    def lower_first(s):
        return s[0].lower() + s[1:]

    return [lower_first(doc["choice1"]), lower_first(doc["choice2"])]  # lm-eval adds the space
