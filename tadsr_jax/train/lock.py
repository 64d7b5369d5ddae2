"""One training run per workdir: a lock file naming its holder, with a lease the holder keeps renewing.

`<workdir>/train.lock` is created with O_CREAT | O_EXCL (atomic on local and NFSv3+ file systems) and holds the
holder's host, pid and start time. While the run lives, a daemon thread touches the file every LEASE_S / 4
seconds. A lock is stale, and is taken over, when its host is this host and its pid is gone, or when it has not
been touched for LEASE_S seconds (a holder on another host that died). Multi-host runs: process 0 takes the
lock and every process follows its decision.

A workdir on an object store (gs://...) is weaker: its lock cannot be created exclusively (epath, tf.io.gfile and
fsspec offer no create-if-absent), so a run writes its record only where no lock object exists, waits CONFIRM_S and
holds the lock only if the object still holds its record (the last writer wins). A run started while another holds
the lock is refused as on a local disk, but two runs started within about CONFIRM_S of each other can both pass.
There the holder renews its lease by rewriting the record with a `renewed` time (object times are not portable
across backends), and a stale lock is deleted instead of renamed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time

import jax

from tadsr_jax import storage

LOCK_FILE = "train.lock"
LEASE_S = 300.0  # a holder that has not renewed its lease for this long is considered dead
CONFIRM_S = 2.0  # object stores: how long a new lock object must keep our record before we hold the lock


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir; the message names it."""


def _holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _stale_reason(holder: dict, age_s: float, lease_s: float) -> str | None:
    """Why the lock of `holder` (untouched for `age_s` seconds) no longer protects a live run; None if it does."""
    if (
        holder.get("host") == socket.gethostname()
        and isinstance(holder.get("pid"), int)
        and not _pid_alive(holder["pid"])
    ):
        return f"its process ({_describe(holder)}) is gone"
    if age_s > lease_s:
        return f"its lease expired ({_describe(holder)}, not renewed for {age_s:.0f} s)"
    return None


class WorkdirLock:
    """`acquire()` or raise WorkdirLocked naming the holder; `release()` removes the file if still ours."""

    def __init__(self, workdir: str, *, lease_s: float = LEASE_S):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.remote = storage.is_url(workdir)
        self.lease_s = lease_s
        self.record = _holder_record()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _create(self) -> bool:
        if self.remote:
            return self._create_object()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def _create_object(self) -> bool:
        """The check-then-write of the module docstring: not atomic."""
        if storage.exists(self.path):
            return False
        self._write_object()
        time.sleep(CONFIRM_S)
        found = self._read()
        return found is not None and found[0] == self.record

    def _write_object(self) -> None:
        with storage.open_file(self.path, "w") as f:
            f.write(json.dumps({**self.record, "renewed": time.time()}))

    def _read(self, path: str | None = None) -> tuple[dict, float] | None:
        """(holder, seconds since its last renewal) of the lock file, None if it vanished meanwhile."""
        path = path or self.path
        try:
            with storage.open_file(path) as f:
                text = f.read()
            modified = storage.mtime(path)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:  # the holder died between creating and writing it, or is writing now
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        renewed = holder.pop("renewed", None) if self.remote else None
        return holder, time.time() - (renewed if isinstance(renewed, int | float) else modified)

    def _take_over(self, holder: dict) -> None:
        """Remove the stale lock of `holder`: rename it (atomic), and if what was renamed is another run's
        fresh lock (it took over first), put it back. An object store has no atomic rename: the lock is deleted if
        it still names `holder`, and `_create_object`'s confirmation settles takers that race."""
        if self.remote:
            found = self._read()
            if found is not None and found[0] == holder:
                with contextlib.suppress(FileNotFoundError):
                    storage.remove(self.path)
            return
        stale = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        renamed = self._read(stale)
        if renamed is not None and renamed[0] != holder:
            with contextlib.suppress(FileExistsError):
                os.link(stale, self.path)
        os.remove(stale)

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises WorkdirLocked."""
        note = None
        for _ in range(3):  # the file may come and go between our calls while another run starts or ends
            if self._create():
                self._start_renewing()
                return note
            found = self._read()
            if found is None:
                continue
            holder, age = found
            reason = (
                _stale_reason(holder, age, self.lease_s)
                if holder
                else (
                    f"its lease expired (unreadable lock, not renewed for {age:.0f} s)" if age > self.lease_s else None
                )
            )
            if reason is None:
                raise WorkdirLocked(
                    f"{self.path}: the workdir is in use by another training run "
                    f"({_describe(holder)}); stop it first, or use another --workdir"
                )
            self._take_over(holder)
            note = f"took over the lock of a dead run: {reason}"
        raise WorkdirLocked(f"{self.path}: could not take the lock (other runs keep starting in this workdir)")

    def _start_renewing(self) -> None:
        def renew():
            while not self._stop.wait(self.lease_s / 4):
                with contextlib.suppress(Exception):  # e.g. a store's transient error: the next renewal retries
                    self._renew()

        self._renewer = threading.Thread(target=renew, name="workdir-lock-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        if not self.remote:
            os.utime(self.path)
            return
        found = self._read()
        if found is not None and found[0] == self.record:  # never overwrite a run that took over meanwhile
            self._write_object()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        found = self._read()
        if found is not None and found[0] == self.record:
            storage.remove(self.path)


@contextlib.contextmanager
def hold(workdir: str, *, lease_s: float = LEASE_S):
    """Hold the workdir's lock for the duration of the block (process 0 takes it; every process follows).

    Yields a note when a stale lock was taken over (None otherwise). Raises WorkdirLocked.
    """
    lock = WorkdirLock(workdir, lease_s=lease_s) if jax.process_index() == 0 else None
    error, note = None, None
    if lock is not None:
        try:
            note = lock.acquire()
        except WorkdirLocked as e:
            error = e
    if jax.process_count() > 1:
        decision = _share_from_process_0(str(error) if error else "")
        error = WorkdirLocked(decision) if decision else None
    if error is not None:
        raise error
    try:
        yield note
    finally:
        if lock is not None:
            lock.release()


def _share_from_process_0(value: str) -> str:
    """Process 0's `value` on every process, through the coordination service's key-value store: unlike a
    collective (gloo gives up after 30 s), it waits for processes that start late."""
    from jax._src import distributed  # Orbax's multihost utilities use the same client

    client, key = distributed.global_state.client, "tadsr_jax/workdir_lock"
    if jax.process_index() == 0:
        client.key_value_set(key, value or "ok")
        return value
    shared = client.blocking_key_value_get(key, 30 * 60 * 1000)
    return "" if shared == "ok" else shared
