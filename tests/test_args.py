"""Typed argument groups: each checks its own values, flat flags land in the one group that has them, every command's
options are unique and documented, a group's option means the same in every command, and the library and the
commands share one default policy."""

import dataclasses
import inspect

import pytest

import gateskip
from gateskip.args import SkipArgs, SuiteArgs, TrainArgs
from gateskip.commands.cli import _commands, _doc_args, options
from gateskip.config import RECOMMENDED, GateSkipConfig
from gateskip.errors import GateSkipError
from gateskip.flags import apply
from gateskip.models import tiny_model
from gateskip.policies import resolve_policy


def test_groups_check_their_own_values():
    with pytest.raises(GateSkipError, match="backbone='half'"):
        TrainArgs(backbone="half")
    with pytest.raises(GateSkipError, match="min_ratio=0.7 is invalid"):
        TrainArgs(min_ratio=0.7, max_ratio=0.5)
    with pytest.raises(GateSkipError, match="exclude each other"):
        TrainArgs(min_ratio=0.1, budget="b.json")
    with pytest.raises(GateSkipError, match="steps=0 is invalid"):
        TrainArgs(steps=0)
    with pytest.raises(GateSkipError, match="policy='best'"):
        SkipArgs(policy="best")
    with pytest.raises(GateSkipError, match="scored-oracle"):  # its scores come from oracle_scores, not a flag
        SkipArgs(policy="oracle_given")
    with pytest.raises(GateSkipError, match="modules='attn,ffn'"):
        SkipArgs(modules="attn,ffn")
    with pytest.raises(GateSkipError, match="offset=-1"):
        SuiteArgs(offset=-1)
    assert SkipArgs(modules="mlp").modules == ("mlp",)  # a comma list, as a flag gives it
    assert TrainArgs(steps=100).ramp(fitted=True) == 10 and TrainArgs(steps=100).ramp() == 80
    assert TrainArgs(steps=100, ramp_steps=7).ramp(fitted=True) == 7


def test_apply_puts_each_flag_in_its_group_and_refuses_unknown_ones():
    groups = {"gates": RECOMMENDED, "loop": TrainArgs()}
    out = apply({"steps": 3, "rank": 8}, groups)
    assert out["loop"] == TrainArgs(steps=3) and out["gates"].rank == 8
    assert groups["loop"] == TrainArgs() and RECOMMENDED.rank == 16  # the defaults are not touched
    with pytest.raises(GateSkipError, match="has no option 'stepz'"):
        apply({"stepz": 3}, groups, "gateskip train")
    # --fallback alone sets every branch's fallback: the MLPs' own (neurons) and its rank follow it
    zero = apply({"fallback": "zero"}, groups)["gates"]
    assert zero.fallback_kinds == {"zero"} and zero.fallback_rank_mlp is None
    both = apply({"fallback": "lowrank", "fallback_mlp": "linear"}, groups)["gates"]
    assert (both.fallback, both.fallback_mlp) == ("lowrank", "linear")
    whole = apply({"loop": TrainArgs(lr=0.5)}, groups)
    assert whole["loop"].lr == 0.5


def test_every_commands_options_are_unique_and_documented():
    for name, fn in _commands().items():
        rows = options(fn)  # raises on a name in two places
        assert len({r[0] for r in rows}) == len(rows), name
        missing = [r[0] for r in rows if not r[3]]
        assert not missing, f"{name}: options without help {missing}"


def test_a_groups_option_means_the_same_in_every_command():
    """An option that comes from an argument group has one default and one help text wherever it appears."""
    seen: dict[str, tuple] = {}
    for name, fn in _commands().items():
        for param in inspect.signature(fn).parameters.values():
            group = param.default
            if not dataclasses.is_dataclass(group) or isinstance(group, type):
                continue
            helps = _doc_args(type(group))[1]
            for f in dataclasses.fields(group):
                key = (type(group).__name__, f.name)
                value = (getattr(group, f.name), helps.get(f.name))
                assert seen.setdefault(key, value) == value, (name, key)
    assert ("SkipArgs", "policy") in seen  # shared by generate and eval


def test_one_default_policy_for_the_library_and_the_commands():
    from gateskip.core import gate_state

    assert resolve_policy(None, calibrated=True) == "threshold"
    assert resolve_policy(None, calibrated=False) == "quantile"
    assert resolve_policy("random", calibrated=True) == "random"
    m = tiny_model("llama")
    gateskip.add_gates(m, GateSkipConfig())
    with gateskip.skipping(m, ratio=0.2) as plan:
        assert plan.policy == "quantile"  # not calibrated yet
    import torch

    gateskip.calibrate(m, [torch.randint(1, 100, (2, 16))], ratio=0.2)
    assert gate_state(m).loaded.calibration is not None
    with gateskip.skipping(m, ratio=0.2) as plan:
        assert plan.policy == "threshold"  # what gateskip generate / eval run on a gates folder
    for name, fn in _commands().items():  # no command sets a policy of its own by default, but the
        for row in options(fn):            # reproduction of the paper's grid, which runs the paper's protocol
            if row[0] == "policy":
                assert row[2] == ("quantile" if name == "reproduce" else None), name


def test_every_committed_artifacts_command_parses_with_todays_flags():
    """Each artifacts/*/COMMAND.txt reproduces its folder: its commands must be valid command lines of the CLI."""
    import shlex
    from pathlib import Path

    from gateskip.commands.cli import build_parser

    files = sorted(Path(__file__).resolve().parents[1].glob("artifacts/*/COMMAND.txt"))
    assert files
    parser = build_parser()
    for f in files:
        lines = [ln.split("#")[0].rstrip().rstrip("\\") for ln in f.read_text().splitlines()
                 if not ln.lstrip().startswith("#")]
        for part in " ".join(lines).split("gateskip ")[1:]:
            try:
                parser.parse_args(shlex.split(part))
            except SystemExit:
                pytest.fail(f"{f}: `gateskip {part.strip()}` is not a valid command line")


def test_fallback_kinds_are_one_registry():
    """Every fallback kind the config accepts is one FALLBACK entry: its module, cost and fit flags together."""
    from gateskip.config import FALLBACK_KINDS
    from gateskip.fallback import FALLBACK, make_fallback
    from gateskip.flops import fallback_flops

    assert set(FALLBACK_KINDS) == set(FALLBACK)
    h = 64
    for name, kind in FALLBACK.items():
        cfg = GateSkipConfig(modules=("mlp",), fallback=name, fallback_rank=8, fallback_neurons=4)
        assert fallback_flops(h, cfg, "mlp") == kind.flops(h, 8, 4)
        m = tiny_model("llama")
        mlp = m.model.layers[0].mlp
        fb = make_fallback(cfg, m.config.hidden_size, m.dtype, "cpu", "mlp", mlp)
        assert (fb is None) == (kind.module is None) and (fb is None or type(fb) is kind.module)
    with pytest.raises(GateSkipError, match="no meaning for attention"):
        GateSkipConfig(modules=("attn", "mlp"), fallback="neurons")
