"""Connecting to Ray: a cluster at an address, or a local Ray that only this machine can reach.

Ray takes the machine's outward-facing address as a node's IP (even when told 127.0.0.1), and its GCS,
raylet and workers then listen on every interface. A local Ray has no other node to talk to, so it is
started in Ray's single-machine mode (the mode Ray uses on macOS and Windows), where the node IP is the
loopback address and every server binds to it. Its processes (GCS, raylet and the workers the raylet starts)
run in a session of their own, so that a signal sent to the driver's process group (Ctrl-C in a terminal,
GNU `timeout`, a scheduler's kill) reaches the driver alone, which then stops them in order; they die with
the driver all the same if it is killed (Ray's kernel fate-sharing). Token authentication
(`RAY_AUTH_MODE=token`) is Ray's default here: a local Ray generates its token in `~/.ray/auth_token`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> str:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray bound to loopback; returns where.

    `quiet` keeps the console to this process's own lines: Ray's start-up messages and warnings and the
    output of its tasks and actors stay in Ray's session logs. Does nothing when this process is already connected."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "already connected"
    level = logging.ERROR if quiet else logging.INFO
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level=level)
        return address
    with _single_machine(), _own_session():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet, logging_level=level)
    ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(ip).is_loopback:
        ray.shutdown()
        raise RuntimeError(f"a local Ray would listen on {ip}, not only on loopback (Ray changed how it picks "
                           "a node's address); start a cluster with `ray start --head` and set ray.address")
    return f"local, {ip}"


def process_cpus() -> int:
    """The CPUs this process may use: its Ray share inside a Ray task or actor, else its affinity mask."""
    ray = sys.modules.get("ray")  # not imported: not inside Ray
    if ray is not None and ray.is_initialized():
        share = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if share:
            return max(1, int(share))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Ray's single-machine mode while a local Ray starts. Ray has no public switch for it: its environment
    variable (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is read once at import and, inherited, would also stop a
    `ray start --address` of this process's children from joining a cluster; the flag it sets is scoped here."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _own_session() -> Iterator[None]:
    """Start the processes of a local Ray in a new session while it starts (Ray does the same on Windows,
    with a new process group). Otherwise a group SIGTERM also ends the GCS, and the driver, stopping its
    trials, waits a minute for the GCS to come back before it gives up."""
    from ray._private import services

    popen = services.ConsolePopen

    class OwnSession(popen):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs, start_new_session=True)

    services.ConsolePopen = OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = popen
