"""A lease lock in storage (local folder or S3) that a crashed holder cannot block forever.

Two retrain runs (or two runs of one pipeline, or two preps into one dataset) must never work
on the same storage at once, and a run that dies without cleaning up must not stop the next
one for good. Every contender
writes its own lease object, ``<lock>/lease-<uuid>.json``, so creating it is exclusive by
construction (a unique name) even on S3, which has no rename and where moto's conditional
PUTs cannot be relied on.

Acquiring (one attempt):

1. write my lease (``held: false``);
2. list the lock folder; a lease whose last renewal is older than its own ``ttl_s`` belongs to
   a crashed or stalled holder: delete it (takeover);
3. if any other live lease remains, I lost: delete mine and retry later (with jitter);
4. otherwise read my lease back (it must still be there) and mark it ``held: true``.

Why at most one contender wins: storage is strongly consistent for list-after-write (local
filesystems; S3 since 2020; moto). If A's listing shows no other lease, any B that writes its
lease later will list after that and see A's lease, so B backs off. If A and B overlap, each
sees the other and both back off; random jitter breaks the tie on the next attempt.

Time: "live" compares storage timestamps only (local mtime or S3 LastModified): the age of a
lease is the modified time of my fresh lease minus that lease's last renewal. The clocks of
the machines never enter, so skewed clocks cannot make a live lease look expired.

The holder renews its lease every ``ttl_s / 3`` in a background thread. The limit every lease
has (there is no fencing token in plain object storage): a holder that stalls longer than
``ttl_s`` (a suspended VM, a multi-minute GC) has been replaced by the time it wakes. It then
finds its lease deleted, or (if its renewal recreated it) a newer held lease; either way
``Lease.lost`` becomes true at the next renewal and ``Lease.check()`` raises. Check it before
committing anything (retrain does, before it promotes), and keep ``ttl_s`` far above the
longest stall you expect.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from emf_dist.storage import Store

LEASE_PREFIX = "lease-"


class LockHeld(RuntimeError):
    """Another live holder kept the lock for the whole wait."""

    def __init__(self, url: str, holder: dict | None, waited_s: float, hint: str = ""):
        self.holder = holder or {}
        who = self.holder.get("holder", "another process")
        purpose = f" ({self.holder['purpose']})" if self.holder.get("purpose") else ""
        super().__init__(f"the lock at {url} is held by {who}{purpose}; waited {waited_s:.0f} s. It is released "
                         "when that run ends, or taken over once its lease has not been renewed for "
                         f"{self.holder.get('ttl_s', '?')} s" + (f". {hint}" if hint else ""))


class LockLost(RuntimeError):
    """This process's lease expired and another process took the lock over."""


@dataclass
class _Seen:
    name: str
    doc: dict
    modified: float


class LeaseLock:
    def __init__(self, url: str, ttl_s: float = 600.0, poll_s: float = 2.0, purpose: str = ""):
        if ttl_s <= 0 or poll_s <= 0:
            raise ValueError(f"ttl_s and poll_s must be > 0, got {ttl_s}, {poll_s}")
        self.url, self.ttl_s, self.poll_s, self.purpose = url, ttl_s, poll_s, purpose
        self.store = Store(url)

    def acquire(self, wait_s: float = 0.0, heartbeat: bool = True, hint: str = "") -> "Lease":
        """Take the lock, trying for up to ``wait_s`` seconds; raises LockHeld (ending with ``hint``) after that."""
        started = time.monotonic()
        while True:
            lease, blocker = self._attempt()
            if lease is not None:
                if heartbeat:
                    lease.start_heartbeat()
                return lease
            waited = time.monotonic() - started
            if waited >= wait_s:
                raise LockHeld(self.store.url, blocker, waited, hint)
            time.sleep(min(self.poll_s * random.uniform(0.5, 1.5), max(0.0, wait_s - waited)) or 0.01)

    def holders(self) -> list[dict]:
        """The live leases now (for messages and status)."""
        return [s.doc for s in self._seen()]

    # ---------------------------------------------------------------- internals

    def _attempt(self) -> tuple["Lease | None", dict | None]:
        name = f"{LEASE_PREFIX}{uuid.uuid4().hex}.json"
        doc = {"holder": f"{socket.gethostname()}:{os.getpid()}:{name[len(LEASE_PREFIX):-5]}",
               "purpose": self.purpose, "ttl_s": self.ttl_s, "held": False}
        self.store.write_json(doc, name)
        now = self.store.modified(name)
        live = [s for s in self._seen(now) if s.name != name]
        if live or now is None:
            self.store.delete(name)
            return None, live[0].doc if live else None
        doc.update(held=True, acquired=now)
        self.store.write_json(doc, name)
        return Lease(self, name, doc), None

    def _seen(self, now: float | None = None) -> list[_Seen]:
        """Live leases; expired ones are deleted on the way (the takeover)."""
        live = []
        for entry in self.store.listing():
            if not entry.name.startswith(LEASE_PREFIX):
                continue
            doc = self.store.read_json(entry.name)
            if doc is None:  # released between the listing and the read
                continue
            if now is not None and now - entry.modified > float(doc.get("ttl_s", self.ttl_s)):
                self.store.delete(entry.name)  # not renewed within its ttl: its holder crashed or stalled
                continue
            live.append(_Seen(entry.name, doc, entry.modified))
        return live


class Lease:
    """A held lock. Use as a context manager, or call release()."""

    def __init__(self, lock: LeaseLock, name: str, doc: dict):
        self.lock, self.name, self.doc = lock, name, doc
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self.doc["holder"]

    def renew(self) -> bool:
        """Rewrite the lease so it stays live; False (and ``lost``) if another process took over."""
        store = self.lock.store
        if self.lost or not store.exists(self.name):
            self.lost = True
            return False
        store.write_json(self.doc, self.name)
        now = store.modified(self.name)
        for other in self.lock._seen(now):
            if other.name == self.name or not other.doc.get("held"):
                continue  # a contender's fresh claim backs off by itself
            if (other.doc.get("acquired", 0), other.name) > (self.doc["acquired"], self.name):
                # A newer holder exists, so this lease expired while we stalled and was taken over;
                # our rewrite just recreated it. Step aside.
                self.lost = True
                store.delete(self.name)
                return False
            store.delete(other.name)  # an older holder's lease recreated after our takeover: stale
        return True

    def check(self) -> None:
        """Raise LockLost unless this lease is still ours: call it before committing results."""
        if not self.renew():
            raise LockLost(f"lost the lock at {self.lock.store.url}: the lease {self.name} was not renewed within "
                           f"{self.lock.ttl_s} s and another run took over")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lock.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except OSError:
                continue  # storage hiccup: try again next beat; the ttl leaves room for two misses

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            self.lock.store.delete(self.name)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
