"""`file://PATH`: workers listed in a YAML or JSON file (a list of workers, or `{workers: [...]}` as in the
router's config file), read again whenever the file changes. A file that is missing or does not parse
keeps the last membership and is reported, like an unreachable registry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from microserve.router.discovery.base import Discovery
from microserve.router.workers import WorkerSpec


def parse_workers(text: str) -> list[WorkerSpec]:
    import yaml  # JSON is YAML too

    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML or JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("workers")
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("expected a list of workers, or a mapping with a 'workers' list")
    return [WorkerSpec.parse(w) if isinstance(w, str) else WorkerSpec.from_dict(w) for w in data]


class FileDiscovery(Discovery):
    def __init__(self, name: str, path: Path, interval_s: float = 1.0) -> None:
        super().__init__(name)
        self.path = path
        self.interval_s = interval_s

    @classmethod
    def from_url(cls, url: str) -> FileDiscovery:
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"a discovery file looks like file:///path/to/workers.yaml, got {url!r}")
        return cls(url, Path(path))

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def watch(self) -> AsyncIterator[list[WorkerSpec]]:
        """Polls the file's inode, size and mtime (no inotify in the standard library; a second is well
        inside the time a leaver takes to drain)."""
        seen: tuple[int, int, int] | None = None
        while True:
            stamp = self._stamp()
            if stamp is None:
                self.failed(f"{self.path}: no such file")
                seen = None
            elif stamp != seen:
                seen = stamp
                try:
                    specs = parse_workers(await asyncio.to_thread(self.path.read_text))
                except (OSError, ValueError, TypeError) as exc:
                    self.failed(f"{self.path}: {exc}")
                else:
                    self.reached()
                    self.status.updates += 1
                    yield specs
            await asyncio.sleep(self.interval_s)
