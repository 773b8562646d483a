"""A checkpoint's state_dict matched to the architecture it is loaded into: the sub-dict that holds
it (``pick_state``), the key prefix the saving framework added (``match_keys``: Lightning's
``model.``, DataParallel's ``module.``, torch.compile's ``_orig_mod.``, or nested ones such as
``model.module.``), the precision it was stored in (``precision_of``), and loading it
(``load_state``) with one-line errors naming the file.

A prefix is stripped only when it makes the keys match the architecture's exactly (names and
shapes); two prefixes that both do are ambiguous and refused (``strip_prefix`` picks one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from bnrt.errors import InputError, OptionError

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim")
MAX_PREFIX_DEPTH = 4  # dot-separated segments a guessed prefix may span (``model.module._orig_mod.``)


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def pick_state(ckpt: dict, key: str | None, where: str) -> dict[str, torch.Tensor]:
    """The state_dict a dict checkpoint holds: ``ckpt[key]`` when ``key`` is given, else the first
    of ``STATE_DICT_KEYS`` that is one, else the dict itself. An optimizer's state is refused as
    what it is."""
    if key is not None:
        if key not in ckpt:
            raise OptionError(f"{where}: no entry {key!r} for `state_dict_key` (entries: {few(sorted(map(str, ckpt)))})")
        if not is_state_dict(ckpt[key]):
            raise InputError(f"{where}: entry {key!r} is a {type(ckpt[key]).__name__}, not a state_dict of tensors")
        return ckpt[key]
    state = next((ckpt[k] for k in STATE_DICT_KEYS if is_state_dict(ckpt.get(k))), None)
    if state is not None:
        return state
    if is_state_dict(ckpt):
        return ckpt
    if {"state", "param_groups"} <= set(ckpt):
        raise InputError(f"{where}: an optimizer's state_dict (state, param_groups), not a model; pass the "
                         "checkpoint that holds the model's weights")
    if any(k in ckpt for k in OPTIMIZER_KEYS):
        raise InputError(f"{where}: holds optimizer state but no model weights (entries: {few(sorted(map(str, ckpt)))}); "
                         "pass the checkpoint that holds the model's weights")
    raise OptionError(f"{where}: no state_dict found (looked for {', '.join(STATE_DICT_KEYS)} or a dict of tensors; "
                      f"entries: {few(sorted(map(str, ckpt)))}); name the entry with `state_dict_key`")


def precision_of(tensors) -> str:
    """The floating dtype most of the values in ``tensors`` are stored in ("float32" when there are
    none); several: "float16+float32" (the majority first)."""
    counts: Counter = Counter()
    for t in tensors:
        if t.is_floating_point():
            counts[str(t.dtype).removeprefix("torch.")] += t.numel()
    return "+".join(name for name, _ in counts.most_common()) or "float32"


@dataclass(frozen=True)
class Matched:
    """A state_dict renamed to the architecture's keys: the prefix stripped (None: none) and how
    many keys outside it were left out."""

    state: dict[str, torch.Tensor]
    prefix: str | None = None
    ignored: int = 0

    @property
    def note(self) -> str | None:
        if self.prefix is None:
            return None
        rest = f"; {self.ignored} key(s) outside it ignored" if self.ignored else ""
        return f"stripped the key prefix {self.prefix!r} from the state_dict ({len(self.state)} keys{rest})"


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Matched:
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return Matched(kept, prefix, len(state) - len(kept))


def _fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> bool:
    """Names and shapes match (a BatchNorm's ``num_batches_tracked`` may be missing: older files
    lack it and its loader fills it in)."""
    missing = set(expected) - set(state)
    return (set(state) <= set(expected) and all(k.endswith(".num_batches_tracked") or k == "num_batches_tracked"
                                                 for k in missing)
            and all(tuple(v.shape) == tuple(expected[k].shape) for k, v in state.items()))


def _prefixes(keys, at_least: int) -> list[str]:
    """Every leading run of up to ``MAX_PREFIX_DEPTH`` dot-separated segments of ``keys`` that
    ``at_least`` of them share."""
    found: Counter = Counter()
    for key in keys:
        parts = key.split(".")[:-1]
        found.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), MAX_PREFIX_DEPTH) + 1))
    return sorted((p for p, n in found.items() if n >= at_least), key=lambda p: (p.count("."), p))


def match_keys(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str,
               strip_prefix: str | None = None) -> Matched:
    """``state`` with the key prefix that makes it match ``expected`` (names and shapes) removed:
    ``strip_prefix`` when given (keys outside it ignored), else the one prefix that does. Two
    prefixes that both match are refused: the file holds two models (a Lightning module's model and
    its EMA copy, say). When none matches, the prefix that leaves the most keys in common (if it
    beats none), so that ``load_state`` names the keys that really differ."""
    if strip_prefix is not None:
        if not strip_prefix.endswith("."):
            strip_prefix += "."
        matched = _strip(state, strip_prefix)
        if not matched.state:
            raise OptionError(f"{where}: no state_dict key starts with `strip_prefix` {strip_prefix!r} "
                              f"(keys: {few(list(state))})")
        return matched
    if _fits(state, expected):
        return Matched(state)
    tried = [_strip(state, p) for p in _prefixes(state, min(len(expected), len(state)) // 2 or 1)]
    fitting = [m for m in tried if _fits(m.state, expected)]
    if len(fitting) > 1:
        raise OptionError(f"{where}: the state_dict matches the architecture under several key prefixes "
                          f"({', '.join(repr(m.prefix) for m in fitting)}); pick one with `strip_prefix`")
    if fitting:
        return fitting[0]
    return max([Matched(state), *tried], key=lambda m: len(set(m.state) & set(expected)))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str,
               strip_prefix: str | None = None) -> Matched:
    """Load ``state`` into ``model`` (``match_keys`` first); ``InputError`` naming the keys that
    differ when it does not match."""
    matched = match_keys(state, model.state_dict(), where, strip_prefix)
    state, expected = matched.state, model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the architecture"
              for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if shapes:
        raise InputError(f"{where}: state_dict does not match the architecture: shape of {few(shapes)}")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {few(result.unexpected_keys)}")
    if problems:
        raise InputError(f"{where}: state_dict does not match the architecture: {'; '.join(problems)}")
    return matched
