"""List-valued options (options.py) and their typed command-line flags (commands/cli.py)."""

import pytest

from gateskip.commands.cli import build_parser
from gateskip.errors import GateSkipError
from gateskip.options import as_list


def test_as_list_takes_lists_comma_text_and_nothing():
    assert as_list("0.1, 0.2,,0.3", float) == [0.1, 0.2, 0.3]
    assert as_list((1, 2), int) == [1, 2] and as_list([" a ", "b"]) == ["a", "b"]
    assert as_list(None) == [] and as_list("") == [] and as_list(0.5, float) == [0.5]
    with pytest.raises(GateSkipError, match=r"--k: 'x' is not a whole number"):
        as_list("1,x", int, "--k")


def test_list_flags_are_parsed_by_their_annotation(capsys):
    p = build_parser()
    args = vars(p.parse_args(["fit", "--compare", "0.15,0.3", "--baselines", "3,6", "--compare-scopes", "mlp"]))
    assert args["compare"] == [0.15, 0.3] and args["baselines"] == [3, 6] and args["compare_scopes"] == ["mlp"]
    assert vars(p.parse_args(["fit", "--compare", ""]))["compare"] == []  # an empty list: no comparison
    assert vars(p.parse_args(["bench", "--ratios", "0,0.5", "--gate", "scalar,lowrank"]))["gate"] == ["scalar",
                                                                                                      "lowrank"]
    with pytest.raises(SystemExit) as e:
        p.parse_args(["bench", "--decode-batches", "1,eight"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'eight' is not a whole number" in err
    assert "(default: 1,8)" in p._subparsers._group_actions[0].choices["bench"].format_help()
