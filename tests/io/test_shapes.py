"""Dynamic axes from the command line and the further shapes they are checked at."""

from __future__ import annotations

import pytest

from bnrt.errors import OptionError
from bnrt.io.shapes import further_shapes, parse_axes, resolve_dynamic, scaled


def test_axes_are_parsed_for_every_input_or_one():
    assert parse_axes("0,2,3") == (None, (0, 2, 3))
    assert parse_axes("3,0,2,2") == (None, (0, 2, 3))
    assert parse_axes("image:0,3") == ("image", (0, 3))
    for bad in ("", "x:", "a,b", "-1"):
        with pytest.raises(OptionError, match="axes like 0,2,3"):
            parse_axes(bad)


def test_dynamic_axes_resolve_per_input():
    names, shapes = ["x", "mask"], [(1, 3, 32, 32), (1, 32, 32)]
    assert resolve_dynamic(None, names, shapes) == {"x": (0,), "mask": (0,)}
    assert resolve_dynamic({None: (0, 2)}, names, shapes) == {"x": (0, 2), "mask": (0, 2)}
    assert resolve_dynamic({"x": (0, 2, 3)}, names, shapes) == {"x": (0, 2, 3), "mask": (0,)}
    with pytest.raises(OptionError, match="the model has no input 'y' \\(its inputs: x, mask\\)"):
        resolve_dynamic({"y": (0,)}, names, shapes)
    with pytest.raises(OptionError, match="input 'mask' has 3 axes"):
        resolve_dynamic({None: (0, 3)}, names, shapes)


@pytest.mark.parametrize("size,other", [(640, 800), (320, 384), (32, 64), (224, 288), (8, 16), (7, 9), (100, 124)])
def test_a_size_grows_by_a_quarter_in_steps_of_its_stride(size, other):
    assert scaled(size) == other


def test_further_shapes_scale_every_dynamic_axis_then_the_last_one():
    shapes = [(1, 3, 320, 320)]
    assert further_shapes({"x": (0,)}, shapes) == []
    assert further_shapes({"x": (0, 2, 3)}, shapes) == [[(1, 3, 384, 384)], [(1, 3, 320, 384)]]
    assert further_shapes({"x": (0, 3)}, shapes) == [[(1, 3, 320, 384)]]
    given = [{None: (3, 96, 80)}]
    assert further_shapes({"x": (0, 2, 3)}, shapes, given) == [[(1, 3, 96, 80)]]
    with pytest.raises(OptionError, match="--check-shapes 3,96,80: input 'x' has shape \\(3, 320, 320\\) and "
                                          "dynamic axes 0,3"):
        further_shapes({"x": (0, 3)}, shapes, given)
    with pytest.raises(OptionError, match="--check-shapes 96,80"):
        further_shapes({"x": (0, 2, 3)}, shapes, [{"x": (96, 80)}])


def test_check_shapes_for_an_unknown_input_are_refused():
    with pytest.raises(OptionError, match="--check-shapes mask: the model has no input 'mask' \\(its inputs: x\\)"):
        further_shapes({"x": (0, 2, 3)}, [(1, 3, 32, 32)], [{"mask": (3, 40, 40)}])
