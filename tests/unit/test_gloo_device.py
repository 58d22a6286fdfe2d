"""The weight-sync group's gloo device (services/weight_sync.py): the interface on the route to the
rendezvous host, or GLOO_SOCKET_IFNAME's. Across hosts, gloo's default (the hostname's address, 127.0.0.1
here) made peers dial loopback; tests/multihost forms the group across network namespaces."""

from __future__ import annotations

import socket

import pytest

from services.weight_sync import gloo_device, local_address


def test_the_route_to_loopback_is_loopback() -> None:
    assert local_address("127.0.0.1", 29500) == "127.0.0.1"


def test_the_route_to_an_outside_address_is_not_loopback() -> None:
    try:
        addr = local_address("192.0.2.1", 9)  # TEST-NET-1: routed by the default route, never reached
    except OSError:
        pytest.skip("no default route on this machine")
    assert not addr.startswith("127.") and socket.inet_aton(addr)


def test_gloo_socket_ifname_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert gloo_device("192.0.2.1", 9) is not None  # built on `lo`, without looking up the route
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-if0")
    with pytest.raises(RuntimeError):
        gloo_device("127.0.0.1", 9)
