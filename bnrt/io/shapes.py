"""Dynamic axes and the further input shapes they are checked at.

``--dynamic-axes 0,2,3`` makes those axes of every input dynamic, ``NAME:0,2,3`` of one input;
the default is the batch axis (0) of every input. Where a non-batch axis is dynamic, the export is
verified and the check run at further shapes: the example's sizes on those axes scaled by 1.25
and rounded to the stride the size suggests (the largest power of two, at most 32, dividing it),
once on every dynamic axis and once on the last one only (a non-square image from a square one),
unless ``--check-shapes`` names them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnrt.errors import InputError, OptionError

Spec = dict[str | None, tuple[int, ...]]  # input name (None: every input) -> axes


def parse_axes(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``0,2,3`` or ``NAME:0,2,3`` as (name or None, axes); ``OptionError`` otherwise."""
    name, sep, axes = text.rpartition(":")
    try:
        parsed = tuple(sorted({int(a) for a in axes.split(",") if a.strip()}))
    except ValueError:
        parsed = ()
    if not parsed or any(a < 0 for a in parsed):
        raise OptionError(f"--dynamic-axes {text!r}: axes like 0,2,3 (every input) or NAME:0,2,3 (one input)")
    return (name if sep else None), parsed


def resolve_dynamic(spec: Spec | None, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The dynamic axes of each input (``names``, full ``shapes`` with the batch) from ``spec``
    (None: the batch axis of every input); ``OptionError`` for an unknown input or an axis the
    input does not have."""
    if not spec:
        return {n: (0,) for n in names}
    unknown = [n for n in spec if n is not None and n not in names]
    if unknown:
        raise OptionError(f"--dynamic-axes {unknown[0]}: the model has no input {unknown[0]!r} "
                          f"(its inputs: {', '.join(names)})")
    dynamic = {}
    for name, shape in zip(names, shapes):
        axes = spec.get(name, spec.get(None, (0,)))
        if axes[-1] >= len(shape):
            raise OptionError(f"--dynamic-axes {name}:{','.join(map(str, axes))}: input {name!r} has "
                              f"{len(shape)} axes ({tuple(shape)})")
        dynamic[name] = axes
    return dynamic


def format_axes(dynamic: dict[str, tuple[int, ...]]) -> str:
    """``x:0,2,3, mask:0``."""
    return ", ".join(f"{n}:{','.join(map(str, a)) or '(none)'}" for n, a in dynamic.items())


def format_shapes(shapes: list[tuple[int, ...]]) -> str:
    """Per-sample shapes of full ones: ``3x384x384`` (inputs separated by spaces)."""
    return " ".join("x".join(map(str, s[1:])) for s in shapes)


def _stride(size: int) -> int:
    stride = 1
    while size % (stride * 2) == 0 and stride < 32:
        stride *= 2
    return stride


def scaled(size: int) -> int:
    """``size`` x 1.25 rounded to the stride ``size`` suggests, and at least one stride more."""
    stride = _stride(size)
    return size + max(stride, round(size * 0.25 / stride) * stride)


def further_shapes(dynamic: dict[str, tuple[int, ...]], shapes: list[tuple[int, ...]],
                   given: list[dict[str | None, tuple[int, ...]]] | None = None) -> list[list[tuple[int, ...]]]:
    """The full input shapes (batch 1) the export is verified and the check run at besides the
    example's, one list per shape set: ``given`` (per-sample shapes by input name, None: every
    input), else the defaults above; none when only batch axes are dynamic. ``OptionError`` for a
    given shape that changes an axis that is not dynamic."""
    names = list(dynamic)
    if given:
        unknown = [n for entry in given for n in entry if n is not None and n not in names]
        if unknown:
            raise OptionError(f"--check-shapes {unknown[0]}: the model has no input {unknown[0]!r} "
                              f"(its inputs: {', '.join(names)})")
        sets = []
        for entry in given:
            full = [(1, *entry.get(n, entry.get(None, tuple(s[1:])))) for n, s in zip(names, shapes)]
            for n, s, f in zip(names, shapes, full):
                fixed = [a for a in range(1, len(s)) if len(f) != len(s) or (f[a] != s[a] and a not in dynamic[n])]
                if fixed:
                    raise OptionError(f"--check-shapes {','.join(map(str, f[1:]))}: input {n!r} has shape "
                                      f"{tuple(s)[1:]} and dynamic axes {','.join(map(str, dynamic[n]))}")
            sets.append(full)
        return sets
    spatial = {n: [a for a in axes if a] for n, axes in dynamic.items()}
    if not any(spatial.values()):
        return []

    def grown(which) -> list[tuple[int, ...]]:
        return [(1, *(scaled(d) if a in which(spatial[n]) else d for a, d in enumerate(s) if a)) for n, s in
                zip(names, shapes)]

    sets = [grown(lambda axes: axes)]
    if any(len(a) > 1 for a in spatial.values()):
        sets.append(grown(lambda axes: axes[-1:]))
    return sets


def within(further: list[list[tuple[int, ...]]], dynamic: dict[str, list[int] | tuple[int, ...]], names: list[str],
           shapes: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """The further shape sets that differ from the example's ``shapes`` (inputs ``names``) on
    ``dynamic`` axes only."""
    return [f for f in further if all(a in dynamic.get(n, ()) for n, s, g in zip(names, shapes, f)
                                      for a in range(1, len(s)) if s[a] != g[a])]


@dataclass(frozen=True)
class ShapeOptions:
    """The export's dynamic axes (``dynamic``: a ``Spec``, None: the batch axes), whether axes no
    exporter keeps dynamic may be fixed at the example's size (``static_ok``), and the further
    per-sample shapes the check runs at (``check``: by input name, None: every input; default:
    ``further_shapes``' own)."""

    dynamic: Spec | None = None
    static_ok: bool = False
    check: list[dict[str | None, tuple[int, ...]]] | None = None

    @property
    def given(self) -> bool:
        return self.dynamic is not None or self.static_ok or self.check is not None


def given_shapes(names: list[str], declared: list[tuple | None], given: list[tuple[int, ...]] | None,
                 where: str) -> list[tuple | None]:
    """The input shapes of a model that declares ``declared`` (None dims: symbolic; None: unknown
    rank) with ``--input-shape`` ``given`` (one per input, with the batch) taking the symbolic
    dims; ``declared`` when nothing is given. ``InputError`` for a count or rank that differs and
    for a size that contradicts a fixed dim, the dim named."""
    if not given:
        return list(declared)
    if len(given) != len(names):
        raise InputError(f"{where}: {len(given)} --input-shape for {len(names)} input(s) "
                         f"({', '.join(repr(n) for n in names)}); give one per input, in order")
    shapes = []
    for name, fixed, shape in zip(names, declared, given):
        shape = tuple(int(d) for d in shape)
        if fixed is not None and len(fixed) != len(shape):
            raise InputError(f"{where}: --input-shape {format_shape(shape)} has {len(shape)} dims, input {name!r} "
                             f"has {len(fixed)} ({format_shape(fixed)})")
        for axis, (d, g) in enumerate(zip(fixed or (), shape)):
            if d is not None and d != g:
                raise InputError(f"{where}: --input-shape {format_shape(shape)} contradicts input {name!r}: its "
                                 f"dim {axis} is fixed at {d} in the file ({format_shape(fixed)})")
        shapes.append(shape)
    return shapes


def filled(declared: list[tuple | None], concrete: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``declared`` shapes with their symbolic dims (None) taken from ``concrete`` (the check data's,
    batch 1): a fixed dim stays what the file says, batch included."""
    return [tuple(c) if d is None else tuple(c[i] if v is None else v for i, v in enumerate(d))
            for d, c in zip(declared, concrete)]


def format_shape(shape: tuple) -> str:
    return ",".join("?" if d is None else str(d) for d in shape)
