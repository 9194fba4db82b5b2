"""Joining Ray as a driver from this project's commands (`emf train`, `emf prep` with an address).

A head registered on a loopback address (`emf cluster up` makes one on 127.0.0.1) is reachable
only if the driver keeps that address: Ray otherwise swaps a loopback bootstrap address for the
machine's routable one, where the head does not listen, and the driver never connects. Ray keeps
it when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, a flag it reads once at import, so the flag is set
here, before ``ray.init``, for loopback addresses only (a user's own setting wins).
"""
from __future__ import annotations

import ipaddress
import os

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str | None) -> bool:
    if not address or address in ("auto", "local"):
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def prepare_driver(address: str | None) -> None:
    if not is_loopback(address):
        return
    os.environ.setdefault(LOOPBACK_VAR, "0")
    from ray._private import ray_constants  # already imported with ray: refresh the flag it read then
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_VAR].lower() not in ("0", "false")


def init_driver(address: str | None, **kwargs):
    import ray
    prepare_driver(address)
    return ray.init(address=address, **kwargs)


def start_autoscaling_coordinator() -> bool:
    """Start, without waiting for it, the actor a Ray instance's first Ray Train fit asks for resources.

    Ray Train (2.60) requests its workers' resources from Ray Data's autoscaling coordinator, a
    detached actor it creates on first use, and waits 5 s for each answer: on a busy machine the
    actor's process takes longer than that to start, so the first fit of a Ray instance sits through
    timed-out requests (docs/benchmarks.md). Created when the driver joins, it starts while the work
    before the first fit runs. Returns False, doing nothing, where Ray has no such actor.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray: its fits pay what they pay
        return False
    get_or_create_autoscaling_coordinator()  # a detached, named actor: it outlives the handle
    return True
