"""`file` discovery: a folder shared by the processes of one machine, no service to run.

Layout under the root (`DYN_FILE_KV`):

    <lease:016x>/.lock          held with flock(LOCK_EX) by the owning process for its whole life
    <lease:016x>/<quoted key>   one file per key; its content is the value

A lease folder is created under a temporary name, locked, then renamed into place, so nobody ever
sees an unlocked live lease. Whoever scans the root and manages to take a lease's lock knows its
owner is gone (the kernel drops flock locks when a process dies, `kill -9` included) and removes
the folder: the dead process's keys disappear within one scan interval, with nobody assigned to
clean up. Writers replace files atomically (write to a temp name, rename).

Watches are served by one scanner task per process that rescans the root every `poll_interval`
seconds (default 0.2 s) while any watch is open, comparing (mtime, size) to read only changed
files. Scans run in a worker thread so the event loop never waits on the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

from .base import Discovery, Watch, WatchEvent

__all__ = ["FileDiscovery"]

log = logging.getLogger("dynamo.discovery.file")

_LOCK = ".lock"
_Snapshot = dict[str, tuple[int, int, bytes]]  # key -> (mtime_ns, size, value)


def _lease_name(lease_id: int) -> str:
    return f"{lease_id:016x}"


class FileDiscovery(Discovery):
    def __init__(
        self, root: Path | str, lease_id: int | None = None, poll_interval: float = 0.2
    ) -> None:
        super().__init__(lease_id)
        self.root = Path(root)
        self.poll_interval = poll_interval
        self._dir = self.root / _lease_name(self.lease_id)
        self._lock_fd: int | None = None
        self._snapshot: _Snapshot = {}
        self._scanner: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._create_lease_dir)

    def _create_lease_dir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        fd = os.open(tmp / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self._dir)
        self._lock_fd = fd

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: str, value: bytes) -> None:
        if self._lock_fd is None:
            raise RuntimeError("FileDiscovery.put before start()")
        await asyncio.to_thread(self._write, key, value)
        await self._rescan()

    def _write(self, key: str, value: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._dir)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, self._dir / quote(key, safe=""))

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self._dir / quote(key, safe=""))
        await self._rescan()

    # -- reads ----------------------------------------------------------------------------

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        await self._rescan()
        return {k: v for k, (_, _, v) in self._snapshot.items() if k.startswith(prefix)}

    async def _on_watch_added(self, watch: Watch) -> None:
        await super()._on_watch_added(watch)
        if self._scanner is None or self._scanner.done():
            self._scanner = asyncio.create_task(self._scan_forever(), name="file-discovery-scan")

    async def _scan_forever(self) -> None:
        while self._watches:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._rescan()
            except Exception:  # a transient file-system error must not end the watch
                log.exception("discovery scan of %s failed", self.root)

    async def _rescan(self) -> None:
        async with self._scan_lock:
            previous = self._snapshot
            current = await asyncio.to_thread(self._scan, previous)
            self._snapshot = current
        for key, (mtime, size, value) in current.items():
            old = previous.get(key)
            if old is None or old[0] != mtime or old[1] != size or old[2] != value:
                self._notify(WatchEvent("put", key, value))
        for key in previous.keys() - current.keys():
            self._notify(WatchEvent("delete", key))

    def _scan(self, previous: _Snapshot) -> _Snapshot:
        result: _Snapshot = {}
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return result
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if path != self._dir and not _lease_alive(path):
                continue
            try:
                files = list(os.scandir(path))
            except FileNotFoundError:
                continue
            for f in files:
                if f.name.startswith("."):
                    continue
                key = unquote(f.name)
                try:
                    st = f.stat()
                    old = previous.get(key)
                    if old is not None and old[0] == st.st_mtime_ns and old[1] == st.st_size:
                        result[key] = old
                        continue
                    with open(f.path, "rb") as fh:
                        value = fh.read()
                except FileNotFoundError:
                    continue
                result[key] = (st.st_mtime_ns, st.st_size, value)
        return result

    async def close(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner
        self._close_watches()
        if self._lock_fd is not None:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)
            os.close(self._lock_fd)
            self._lock_fd = None


def _lease_alive(lease_dir: Path) -> bool:
    """True while the owner holds the lease lock; removes the folder of a dead owner."""
    try:
        fd = os.open(lease_dir / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False  # being created or removed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        # We got the lock: the owner is gone. Remove its keys while holding the lock.
        shutil.rmtree(lease_dir, ignore_errors=True)
        log.debug("removed dead lease %s", lease_dir.name)
        return False
    finally:
        os.close(fd)
