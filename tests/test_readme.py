"""Every code block and command of README.md runs as written on the installed package, at small scale.

Python blocks run whole (the first one is the README's first screen: the embedded model and the committed gates);
each command line runs through the same entry point as the shell, with flags appended that shrink the work (the
last occurrence of a flag wins, so the README's own values are overridden, never edited)."""

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.real

# per command: flags appended to make it small (same meaning, less work)
SMALL = {
    "generate": ["--max-new-tokens", "4"],
    "train": ["--steps", "1", "--fallback-batches", "1", "--calibrate-batches", "1", "--chat-texts", "4",
              "--limit-texts", "64", "--save-every", "1", "--seq-len", "32", "--batch-size", "1"],
    "eval": ["--limit", "2", "--fidelity-tokens", "4", "--fidelity-prompts", "0", "--methods", "gateskip",
             "--ratios", "0"],
    "bench": ["--prefill-batch", "1", "--prefill-len", "16", "--prompt-len", "4", "--new-tokens", "3",
              "--repeats", "1", "--warmup", "0", "--decode-batches", "1", "--threads", "1"],
    "inspect": ["--max-tokens", "64"],
}
LM_EVAL_SMALL = ["--limit", "2"]
# per Python block: size arguments made small (the same calls, less work)
SMALL_PY = [
    [("saved=saved)", "saved=saved, max_new_tokens=8)")],
    [('limit=64), 256, 4, 2)', 'limit=8), 64, 2, 1)')],
    [("limit=20,", "limit=2,")],
]


def blocks(lang: str) -> list[str]:
    """The fenced blocks whose info string is ``lang`` ("" for a bare fence), in order."""
    found, current, info = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def command_lines() -> list[str]:
    lines = []
    for block in blocks(""):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("gateskip ", "gateskip-lm-eval ")):
                lines.append(line)
    return lines


@pytest.fixture
def in_clone(tmp_path, monkeypatch):
    """A working folder that sees the clone's committed artifacts, as a fresh clone does."""
    (tmp_path / "artifacts").symlink_to(ROOT / "artifacts")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_what_this_test_runs():
    assert len(blocks("python")) >= 3 and len(command_lines()) >= 6
    first = blocks("python")[0]
    assert len([x for x in first.splitlines() if x.strip()]) <= 8  # the first screen's example


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, in_clone, capsys):
    code = blocks("python")[index]
    for old, new in SMALL_PY[index] if index < len(SMALL_PY) else []:
        assert old in code, f"README python block {index + 1} changed: update SMALL_PY"
        code = code.replace(old, new)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block prints what it shows


@pytest.mark.parametrize("line", command_lines())
def test_command_runs(line, in_clone, capsys):
    argv = shlex.split(line)
    if argv[0] == "gateskip-lm-eval":
        from gateskip.commands.lm_eval_cli import main

        main(argv[1:] + LM_EVAL_SMALL)
        assert "compute_saved=" in capsys.readouterr().out
        return
    from gateskip.commands.cli import main

    assert main(argv[1:] + SMALL.get(argv[1], [])) == 0
