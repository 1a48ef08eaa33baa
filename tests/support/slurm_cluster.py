"""A real one-machine SLURM cluster (Debian's slurmctld, slurmd and munge) for the sbatch tests.

The daemons run as root with every state, spool, log and pid file under one temporary
directory and a slurm.conf that clients find through SLURM_CONF, so nothing of the host's
configuration is touched. `.ci/run` installs the packages; `unavailable()` says why the tests
must skip where that was impossible (no packages, not root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pargo_dist.runtime.rank_env import free_port

BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")

SLURM_CONF = """\
ClusterName=pargo-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its old credential expired (default 120 s): keep tests quick
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=30
InactiveLimit=0
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def unavailable() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurmctld slurmd slurm-client munge (.ci/run does this)")
    if os.geteuid() != 0:
        return "the one-machine SLURM cluster runs its daemons as root; these tests are not root"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with `start()`, use `env` for client commands (sbatch, scontrol), `stop()` at the end."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(host=self.host, cpus=self.cpus, root=self.root,
                                               ctld_port=free_port(), slurmd_port=free_port()))
        self._start_munge()
        self.procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        self.procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM node did not come up in {timeout}s; see {self.root}/slurmctld.log and slurmd.log")

    def _start_munge(self) -> None:
        """munged runs as the munge user with the packaged key; one already running is reused."""
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)

    def sbatch(self, script: Path, *args: str) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=self.env, capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, ExitCode, Restarts, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True,
                             text=True)
        fields = {}
        for word in out.stdout.split():
            key, eq, value = word.partition("=")
            if eq:
                fields.setdefault(key, value)
        return fields

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
