"""A real one-node SLURM cluster on this machine for tests/e2e/test_slurm.py: Debian's munged, slurmctld and
slurmd started from a private directory (their own munge key, socket, ports, state and logs), so nothing under
/etc is touched and several clusters never collide. Clients find it through SLURM_CONF."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def available() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs job steps as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """`with LocalSlurm(tmp) as cluster:`; `cluster.env` has SLURM_CONF for sbatch and friends. The node
    declares `cpus` CPUs (more than this machine has, so a job and a job array can run side by side)."""

    def __init__(self, root: Path, cpus: int = 8) -> None:
        self.root, self.cpus = root, cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def __enter__(self) -> LocalSlurm:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "munge").chmod(0o700)
        socket_path = r / "munge" / "munge.socket"
        subprocess.run([_bin("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
                        f"--seed-file={r / 'munge' / 'munged.seed'}"], check=True, timeout=30)
        (r / "slurm.conf").write_text("\n".join([
            "ClusterName=orztest", f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "KillWait=10", "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=16000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        conf = str(r / "slurm.conf")
        self.procs.append(subprocess.Popen([_bin("slurmctld"), "-D", "-c", "-f", conf], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen([_bin("slurmd"), "-D", "-f", conf, "-N", self.node], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                 check=False).stdout
            if out.strip() in ("idle", "mixed"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node never came up:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in
                         (self.root / "slurmctld.log", self.root / "slurmd.log") if p.exists())

    def run(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, …)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def __exit__(self, *exc) -> None:
        # every job cancelled and gone (slurmd reaps its step daemons) before the daemons stop
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env, capture_output=True,
                       timeout=30, check=False)
        deadline = time.time() + 60
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30,
                                   check=False).stdout
            if not queue.strip():
                break
            time.sleep(1)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
