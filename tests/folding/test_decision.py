"""Decisions as data: coded refusals, one sentence for people, the JSON of the fold report."""

from __future__ import annotations

import ast
import re

import pytest

from bnrt.errors import HealthError
from bnrt.folding.decision import CODES, Refusal, Target, folded, skipped

from ..conftest import ROOT


def test_an_unknown_refusal_code_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown refusal code 'nope'"):
        Refusal("nope", "message")


def test_skipped_decision_keeps_one_refusal_per_direction():
    d = skipped("bn", [Refusal("shared-output", "output of 'conv' also feeds 'add'", "conv", "add", "backward"),
                       Refusal("no-layer-after", "output feeds 'relu', not a layer it can fold into", "relu",
                               direction="forward")], ("a warning",))
    assert d.codes == ("shared-output", "no-layer-after")
    assert d.reason == ("output of 'conv' also feeds 'add'; forward: output feeds 'relu', not a layer it can fold into")
    assert d.to_json() == {
        "bn": "bn", "kind": "module", "status": "skipped", "rule": None, "into": [], "direction": None, "through": [],
        "reason": d.reason, "warnings": ["a warning"],
        "refusals": [{"direction": "backward", "code": "shared-output", "subject": "conv", "other": "add",
                      "message": "output of 'conv' also feeds 'add'"},
                     {"direction": "forward", "code": "no-layer-after", "subject": "relu", "other": None,
                      "message": "output feeds 'relu', not a layer it can fold into"}]}


def test_a_refusal_about_the_bn_itself_has_no_direction():
    d = skipped("bn", [Refusal("training-mode", "in training mode")], functional={"node": "batch_norm"})
    assert (d.reason, d.codes, d.to_json()["kind"]) == ("in training mode", ("training-mode",), "functional")


def test_folded_decision_derives_rule_layers_views_and_maps_from_its_targets():
    d = folded("bn", "forward", [Target("bn->linear", "a", "linear", through=("flatten",), channels=(0, 0, 1, 1)),
                                 Target("bn->conv", "b", "conv", groups=2)])
    assert (d.rule, d.into, d.through, d.maps, d.codes, d.reason) == (
        "bn->linear,bn->conv", ("a", "b"), ("flatten",), ((0, 0, 1, 1), None), (), None)


def _raised_codes(exception: str) -> set[str]:
    """The codes bnrt's sources pass to ``exception(...)``: the first argument of NotFoldable, the
    second of HealthError (string literals; a computed code would be missed, and is not used)."""
    position = {"NotFoldable": 0, "HealthError": 1}[exception]
    found = set()
    for path in (ROOT / "bnrt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == exception and len(node.args) > position:
                arg = node.args[position]
                assert isinstance(arg, ast.Constant), f"{path}:{node.lineno}: a code that is not a literal"
                found.add(arg.value)
    return found


def test_the_refusal_codes_raised_are_exactly_the_documented_ones():
    """An undocumented code would reach users and CI gates with no meaning; a documented one never
    raised is dead."""
    assert _raised_codes("NotFoldable") == set(CODES)
    assert all(code == code.lower() and " " not in code and CODES[code] for code in CODES)


def test_the_health_codes_raised_are_the_ones_health_error_lists():
    listed = set(re.findall(r"``([a-z]+-[a-z-]+)``", HealthError.__doc__))
    assert _raised_codes("HealthError") == listed == {"nonfinite-statistics", "shape-mismatch", "negative-variance",
                                                       "zero-variance"}


