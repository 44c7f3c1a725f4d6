"""This host's address as the other ranks reach it."""

from __future__ import annotations

import socket

DEFAULT_ROUTE = "10.255.255.255"  # off every host: a route toward it is the default route


def local_address(toward: str = DEFAULT_ROUTE) -> str:
    """This host's address on its route toward `toward` (loopback where it has none): the
    hostname may resolve to an address the other ranks cannot reach (loopback, or the host's
    own in a network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((toward, 9))  # picks a route; sends nothing
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
