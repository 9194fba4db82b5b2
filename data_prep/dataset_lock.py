"""One `emf prep` at a time per dataset: a lease lock in ``<out>/_prep/lock`` (emf_dist/lease.py).

Two preps into one folder would both plan the same version from the same manifest and both
write it: shards listed twice, counts doubled, all with exit 0. The second one now waits up
to ``lock_wait_s`` and then refuses, naming the holder. A prep killed without releasing blocks
the next one for at most ``lock_ttl_s`` (its lease is no longer renewed, then taken over).
Works the same on a local folder and on S3: leases are uniquely named objects, no rename.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from emf_dist.lease import Lease, LeaseLock
from emf_dist.storage import join, redact

LOCK_FOLDER = ("_prep", "lock")
BUSY_HINT = ("Another `emf prep` is writing this dataset: rerun when it has finished (a rerun adds only what "
             "is new), or set lock_wait_s=SECONDS to wait for it")


def prep_lock(out: str, ttl_s: float) -> LeaseLock:
    return LeaseLock(join(out, *LOCK_FOLDER), ttl_s=ttl_s, poll_s=min(2.0, ttl_s / 3),
                     purpose=f"emf prep into {redact(out)}")


@contextlib.contextmanager
def dataset_lock(out: str, wait_s: float, ttl_s: float) -> Iterator[Lease]:
    lease = prep_lock(out, ttl_s).acquire(wait_s=wait_s, hint=BUSY_HINT)
    try:
        yield lease
    finally:
        lease.release()
