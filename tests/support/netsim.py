"""Several hosts on this machine: each a network namespace with an address of its own on one bridge
(iproute2; needs root, as CI has). A host's processes run under `ip netns exec`, so they see only their own
loopback and eth0: a process that binds or dials 127.0.0.1 for a peer fails here as it would across
machines. The test process itself sits on the bridge (10.77.<k>.1), like an operator's machine.

Faults: `partition(host)` takes the host's link down (a pulled cable: frames are lost, connections hang
until their timeouts), `heal(host)` brings it back; `impair(host, delay_ms, jitter_ms, loss)` on a host
added with `impairable=True`, whose link runs through tests/support/wire.py (a user-space netem).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WIRE = Path(__file__).with_name("wire.py")


def available() -> str | None:
    """None when namespaces can be made here, else why not (the tests skip with this reason only off CI)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(["ip", "netns", "add", "orz-probe"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "orz-probe"], check=False)
    return None


def sh(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    link: str  # the bridge-side device: down = partitioned
    control: Path | None = None  # wire settings, for an impairable host

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


class Net:
    def __init__(self, tag: str, subnet: int, workdir: Path) -> None:
        self.tag, self.subnet, self.workdir = tag, subnet, workdir
        self.bridge = f"orzbr{tag}"
        self.gateway = f"10.77.{subnet}.1"
        self.hosts: dict[str, Host] = {}
        self._wires: list[subprocess.Popen] = []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add(self, name: str, impairable: bool = False) -> Host:
        i = len(self.hosts) + 2
        host = Host(name, f"orz{self.tag}-{name}", f"10.77.{self.subnet}.{i}", f"orz{self.tag}o{i}")
        inner = f"orz{self.tag}i{i}"
        sh("ip", "netns", "add", host.ns)
        sh(*host.prefix, "ip", "link", "set", "lo", "up")
        if impairable:
            host.control = self.workdir / f"wire-{name}.json"
            host.control.write_text("{}")
            wire = subprocess.Popen([sys.executable, str(WIRE), host.link, inner, str(host.control)],
                                    stdout=subprocess.PIPE, text=True)
            assert wire.stdout is not None and wire.stdout.readline().strip() == "ready", "wire did not start"
            self._wires.append(wire)
        else:
            sh("ip", "link", "add", host.link, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", host.ns)
        sh(*host.prefix, "ip", "link", "set", inner, "name", "eth0")
        sh(*host.prefix, "ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
        sh(*host.prefix, "ip", "link", "set", "eth0", "up")
        sh("ip", "link", "set", host.link, "master", self.bridge)
        sh("ip", "link", "set", host.link, "up")
        self.hosts[name] = host
        return host

    def partition(self, host: Host) -> None:
        sh("ip", "link", "set", host.link, "down")

    def heal(self, host: Host) -> None:
        sh("ip", "link", "set", host.link, "up")

    def impair(self, host: Host, delay_ms: float = 0, jitter_ms: float = 0, loss: float = 0) -> None:
        assert host.control is not None, f"{host.name} was not added with impairable=True"
        host.control.write_text(json.dumps({"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss}))

    def wire_stats(self, host: Host) -> dict:
        assert host.control is not None
        path = Path(f"{host.control}.stats")
        return json.loads(path.read_text()) if path.exists() else {}

    def listeners(self, host: Host) -> list[str]:
        """Local addresses of the host's listening TCP sockets (`ss -ltnH`)."""
        out = subprocess.run([*host.prefix, "ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
        return [line.split()[3] for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        for wire in self._wires:
            wire.kill()
            wire.wait(10)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
