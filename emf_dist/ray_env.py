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
