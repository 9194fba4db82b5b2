"""The pipelines' lease lock: the mechanism lives in the base (emf_dist/lease.py), so that data
prep, below the pipelines, can hold the same kind of lock on a dataset it writes."""
from emf_dist.lease import LEASE_PREFIX, Lease, LeaseLock, LockHeld, LockLost

__all__ = ["LEASE_PREFIX", "Lease", "LeaseLock", "LockHeld", "LockLost"]
