"""Two hosts on one machine that share nothing but the installed code: Linux network namespaces
on a bridge (each its own address), each running its processes in a mount namespace of its own
with a private /tmp (so Ray's session folders, and anything a job writes locally, stay on that
host). A project cloned (or a Python installed) under /tmp stays visible on both: its folder is
bound back into each host's /tmp. Needs root and `ip`/`unshare`; everything is found again by
the names made here."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def can_make_hosts() -> str | None:
    """None when this machine can build the hosts, else why not."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"needs `{tool}`"
    probe = f"mrp{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def code_under_tmp() -> list[str]:
    """The project's folder and Python's prefix where they lie under /tmp (none nested in
    another): what each host's private /tmp must still show."""
    found: list[str] = []
    for path in sorted({str(Path(__file__).resolve().parents[2]), str(Path(sys.prefix).resolve())}, key=len):
        if Path(path).is_relative_to("/tmp") and not any(Path(path).is_relative_to(f) for f in found):
            found.append(path)
    return found


def private_tmp(keep: list[str]) -> str:
    """Shell that mounts a fresh tmpfs on /tmp and binds each folder of `keep` (under the old
    /tmp) back at its path, through a descriptor opened before the tmpfs hid it."""
    fds = range(3, 3 + len(keep))
    line = "".join(f"exec {fd}<{shlex.quote(p)}; " for fd, p in zip(fds, keep)) + "mount -t tmpfs tmpfs /tmp"
    for fd, p in zip(fds, keep):
        line += f" && mkdir -p {shlex.quote(p)} && mount --no-canonicalize --bind /proc/self/fd/{fd} {shlex.quote(p)}"
        line += f" && exec {fd}<&-"
    return line


@dataclass
class Host:
    name: str  # the network namespace
    address: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    keep: list[str] = field(default_factory=code_under_tmp)  # folders under /tmp this host still sees

    def start(self, command: str, env: dict[str, str], log: str) -> subprocess.Popen:
        """`command` (a shell line) on this host, in a mount namespace whose /tmp is a fresh
        tmpfs: the first process started here makes it, later ones join it."""
        if self.procs:
            prefix = ["nsenter", f"--net=/var/run/netns/{self.name}", f"--mount=/proc/{self.procs[0].pid}/ns/mnt"]
            argv = [*prefix, "sh", "-c", command]
        else:
            argv = ["ip", "netns", "exec", self.name, "unshare", "--mount", "--propagation", "private",
                    "sh", "-c", f"{private_tmp(self.keep)} && exec {command}"]
        proc = subprocess.Popen(argv, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, command: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        """A short command in this host's mount namespace (started by `start`)."""
        argv = ["nsenter", f"--net=/var/run/netns/{self.name}", f"--mount=/proc/{self.procs[0].pid}/ns/mnt",
                "sh", "-c", command]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        """SIGKILL every process of this host (as a machine that goes away)."""
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.5)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        self.procs.clear()


@contextlib.contextmanager
def two_hosts():
    """Yields (bridge address, host A, host B) on a /24 of 10.x.0.0 drawn at random; on exit,
    the hosts' processes (by the PIDs their namespaces list), the namespaces and the bridge go."""
    tag = secrets.token_hex(2)
    net = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
    bridge = f"mrbr{tag}"
    hosts = [Host(f"mrh{tag}a", f"{net}.1"), Host(f"mrh{tag}b", f"{net}.2")]
    made: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append("bridge")
        _ip("addr", "add", f"{net}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, h in enumerate(hosts):
            subprocess.run(["ip", "netns", "add", h.name], check=True, capture_output=True)
            made.append(h.name)
            veth = f"mrv{tag}{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "e0", "netns", h.name)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("addr", "add", f"{h.address}/24", "dev", "e0", netns=h.name)
            _ip("link", "set", "e0", "up", netns=h.name)
            _ip("link", "set", "lo", "up", netns=h.name)
        yield f"{net}.254", hosts[0], hosts[1]
    finally:
        for h in hosts:
            h.stop()
            if h.name in made:
                subprocess.run(["ip", "netns", "delete", h.name], capture_output=True)
        if "bridge" in made:
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
