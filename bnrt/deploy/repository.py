"""The models `bnrt serve` serves, kept in step with their folder: a Triton-style repository
(``REPO/NAME/VERSION/model.onnx``) or one ONNX file (its stem, version 1).

``refresh`` (re)reads models from disk: a new or changed file gets a new session, warmed up by one
run, and its own batcher, and only then takes requests; the batcher it replaces finishes the
requests it holds before it stops, so a swap fails no request. A version gone from disk is retired
the same way. ``poll`` refreshes every model every few seconds (``--poll-repo``); ``unload`` retires
a model's versions (and keeps ``poll`` from bringing it back until ``load``). A file that cannot be
loaded leaves what is served as it was; the index says why.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from bnrt.deploy.batcher import Batcher
from bnrt.deploy.kserve import RequestError, ServedModel, discover
from bnrt.errors import first_line
from bnrt.session import Session

Key = tuple[str, str]  # (name, version)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def warm_up(session: Session) -> None:
    """One run on zeros of batch 1, so that the first request pays no start-up cost; only where every
    other axis is fixed (a size made up for a dynamic one may be one the model cannot take)."""
    if all(s.shape and all(d is not None for d in s.shape[1:]) for s in session.inputs):
        session.run_dict({s.name: np.zeros([1, *s.shape[1:]], s.dtype) for s in session.inputs})


class Repository:
    """Served models by name and version, their batchers, and the files they came from."""

    def __init__(self, path: str | Path, make_session: Callable[[Path], tuple[Session, ...]],
                 make_batcher: Callable[[ServedModel], Batcher]):
        self.path, self.make_session, self.make_batcher = Path(path), make_session, make_batcher
        self.models: dict[str, dict[str, ServedModel]] = discover(self.path, session=make_session)
        self.batchers: dict[Key, Batcher] = {(m.name, m.version): make_batcher(m)
                                             for versions in self.models.values() for m in versions.values()}
        disk = self.on_disk()
        self.stamps = {key: _stamp(disk[key]) for key in self.batchers}
        self.failed: dict[Key, str] = {}
        self.unloaded: set[str] = set()
        self._retiring: set[asyncio.Task] = set()

    def on_disk(self) -> dict[Key, Path]:
        if self.path.is_file():
            return {(self.path.stem, "1"): self.path} if self.path.exists() else {}
        return {(f.parent.parent.name, f.parent.name): f for f in sorted(self.path.glob("*/*/model.onnx"))
                if f.parent.name.isdigit()}

    def index(self) -> list[dict]:
        """Triton's repository index: every model version on disk or served, READY or UNAVAILABLE (why)."""
        keys = sorted(set(self.on_disk()) | set(self.batchers), key=lambda k: (k[0], int(k[1])))
        rows = []
        for name, version in keys:
            ready = version in self.models.get(name, {})
            reason = "unloaded" if name in self.unloaded else self.failed.get((name, version), "")
            rows.append({"name": name, "version": version, "state": "READY" if ready else "UNAVAILABLE",
                         **({"reason": reason} if reason else {})})
        return rows

    async def refresh(self, names: set[str] | None = None) -> None:
        """Load what is new or changed on disk for ``names`` (None: every model not unloaded), retire
        what is gone."""
        loop = asyncio.get_running_loop()
        disk = {k: p for k, p in self.on_disk().items()
                if (k[0] in names if names is not None else k[0] not in self.unloaded)}
        for key, path in disk.items():
            try:
                stamp = _stamp(path)
                if self.stamps.get(key) == stamp and key in self.batchers:
                    continue
                sessions = await loop.run_in_executor(None, self.make_session, path)
                for session in sessions:
                    await loop.run_in_executor(None, warm_up, session)
            except Exception as exc:  # a half-written or broken file: what is served stays
                self.failed[key] = first_line(exc) or type(exc).__name__
                print(f"bnrt serve: {path}: not loaded ({self.failed[key]})", file=sys.stderr, flush=True)
                continue
            if names is None and key[0] in self.unloaded:  # unloaded while it was loading
                continue
            self.failed.pop(key, None)
            model = ServedModel(*key, sessions)
            batcher = self.make_batcher(model)
            batcher.start()
            old, self.batchers[key] = self.batchers.get(key), batcher  # the batcher first: requests find it
            self.models.setdefault(key[0], {})[key[1]] = model
            self.stamps[key] = stamp
            if old is not None:
                self._retire(old)
        for key in [k for k in self.batchers if k not in disk and (names is None or k[0] in names)
                    and (names is not None or k[0] not in self.unloaded)]:
            self._remove(key)

    def unload(self, name: str) -> None:
        if name not in self.models:
            raise RequestError(404, f"unknown model {name!r}")
        self.unloaded.add(name)
        for key in [k for k in self.batchers if k[0] == name]:
            self._remove(key)

    async def load(self, name: str) -> None:
        if not any(k[0] == name for k in self.on_disk()):
            raise RequestError(404, f"no model {name!r} in {self.path}")
        self.unloaded.discard(name)
        await self.refresh({name})
        if name not in self.models:
            raise RequestError(400, f"model {name!r} could not be loaded: "
                                    + "; ".join(v for k, v in self.failed.items() if k[0] == name))

    def _remove(self, key: Key) -> None:
        versions = self.models.get(key[0], {})
        versions.pop(key[1], None)
        if not versions:
            self.models.pop(key[0], None)
        self.stamps.pop(key, None)
        self._retire(self.batchers.pop(key))  # gone at once: no request finds it from now on

    def _retire(self, batcher: Batcher) -> None:
        """Stop ``batcher`` once the requests it holds are answered."""
        async def retire() -> None:
            await batcher.drain()
            await batcher.stop()
        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def poll(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.refresh()
