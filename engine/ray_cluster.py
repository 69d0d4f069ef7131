"""Ray for a run: started here, for this machine only, or joined at a cluster's address.

Started by bricks (no address), Ray listens on 127.0.0.1 only and keeps its token
authentication, without the warnings it prints about either. Joining a cluster (an address,
or `RAY_ADDRESS`, which `ray.init` reads first), the cluster's own settings apply, and a
cluster that is not there is one `RayClusterError` line instead of a traceback or a hang.
Worker log lines reach the driver uncoloured unless stderr and stdout are terminals.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlsplit

from bricks.common.errors import first_line

from .recipe import ExecutorConfig

log = logging.getLogger("bricks")

# Long enough for a head node across a slow network; a dead address fails in this time.
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = ("127.0.0.1", "::1")


class RayClusterError(RuntimeError):
    pass


def cluster_address(executor: ExecutorConfig) -> str | None:
    """The cluster a run joins (None: bricks starts Ray here)."""
    return os.environ.get("RAY_ADDRESS") or executor.address


def init_ray(executor: ExecutorConfig) -> None:
    """Join the cluster the run names, or start Ray on this machine; once per process."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    _quiet_worker_logs()
    address = cluster_address(executor)
    if address:
        _join(address)
    else:
        _start_here(executor.num_cpus)


def _join(address: str) -> None:
    where = f"{address} (from RAY_ADDRESS)" if address == os.environ.get("RAY_ADDRESS") else address
    hint = ("start one with `ray start --head` (then --address auto), leave the address out to start "
            "Ray on this machine, or run with --local")
    if not _answers(address):
        raise RayClusterError(f"no Ray cluster found at {where} (nothing accepts connections there); {hint}")
    import ray

    try:
        ray.init(address=address, **_INIT_OPTIONS)
    except ConnectionError as exc:  # e.g. `auto` found no cluster
        why = "none runs on this machine" if address == "auto" else first_line(exc)
        raise RayClusterError(f"no Ray cluster found at {where} ({why}); {hint}") from None
    except Exception as exc:  # e.g. a Ray version or authentication mismatch
        raise RayClusterError(f"cannot join the Ray cluster at {where}: {first_line(exc)}") from None


def _start_here(num_cpus: int | None) -> None:
    # Both settings are read when Ray is imported; set later, they would disagree with it.
    if "ray" not in sys.modules:
        # Token authentication is what Ray does by default for a cluster it starts; saying so
        # explicitly keeps it on without Ray's warning about it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        # `ray.init` turns a node address of 127.0.0.1 into the machine's network address,
        # except where it does not build multi-node clusters (this setting): then every Ray
        # server binds to 127.0.0.1. A cluster is joined with an address instead.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=num_cpus, **_INIT_OPTIONS)
    node = ray.util.get_node_ip_address()
    if node not in LOOPBACK:
        log.warning("Ray listens on %s, not on 127.0.0.1 only: it was imported before bricks started it "
                    "(set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray to keep it local)", node)


def stop_ray() -> None:
    """Stop the Ray this process started (or leave the cluster it joined), if any. Left to
    Ray's own exit handler, the same shutdown first sleeps half a second."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


_INIT_OPTIONS = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)


def _quiet_worker_logs() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each worker's warnings as they are, not merged
    if not (sys.stderr.isatty() and sys.stdout.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI codes in logs and pipes


def _answers(address: str) -> bool:
    """Whether something accepts connections at a HOST:PORT or ray://HOST:PORT address
    (`auto` is looked up by Ray itself). Ray reads 127.0.0.1 as this machine's network
    address, so both are tried for it."""
    if address == "auto":
        return True
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        if parts.scheme == "ray":
            return True  # Ray's client has a default port
        raise RayClusterError(f"Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), "
                              "ray://HOST:PORT or auto")
    hosts = [parts.hostname]
    if parts.hostname in ("localhost", *LOOPBACK):
        import ray

        hosts.append(ray.util.get_node_ip_address())
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return True
        except OSError:
            continue
    return False

