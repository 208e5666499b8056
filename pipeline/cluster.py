"""Connecting to Ray: a cluster at an address, or a local Ray that only this machine can reach.

Ray takes the machine's outward-facing address as a node's IP (even when told 127.0.0.1) and its GCS,
raylet and workers then listen on every interface. A local Ray has no other node to talk to, so it runs
in Ray's single-machine mode (the mode Ray uses on macOS and Windows), where the node IP is the loopback
address and every server binds to it. Token authentication (`RAY_AUTH_MODE=token`) is Ray's default
here: a local Ray generates its token in `~/.ray/auth_token`.
"""
from __future__ import annotations

import ipaddress
import os

SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for multi-node clusters, read when `ray` is first imported; "0" keeps Ray on loopback."""


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray bound to loopback; returns where.

    Does nothing when this process is already connected."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(SINGLE_MACHINE, "0")  # before `import ray`; inherited by Ray's processes
    import ray

    if ray.is_initialized():
        return "already connected"
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(ip).is_loopback:  # Ray was imported before the switch was set
        ray.shutdown()
        raise RuntimeError(f"a local Ray would listen on {ip}, not only on loopback: set {SINGLE_MACHINE}=0 "
                           "before Ray is imported, or start a cluster (`ray start --head`) and set ray.address")
    return f"local, {ip}"
