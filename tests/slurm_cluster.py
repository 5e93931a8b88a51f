"""A real one-node Slurm cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd.

Debian's packages (scripts/install-system-deps.sh) run here without systemd or cgroups. The daemons
run in the foreground in their own process groups, so `stop` ends exactly the processes `start`
launched. Slurm's ports are fixed, so there is one cluster per machine: a cluster that already
answers is used as it is and left running (`started` stays empty).

The configuration goes to Slurm's default path, /etc/slurm/slurm.conf, because the executor
plugin's job step drops SLURM_CONF from the environment of the `srun` it starts inside each job.
`stop` removes the file again if `start` wrote it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# one-node test cluster written by tests/slurm_cluster.py\n"


def available() -> str | None:
    """None when the Slurm and munge programs are installed, else what is missing."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    return f"missing {', '.join(missing)} (scripts/install-system-deps.sh)" if missing else None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """`with SlurmCluster(folder, partitions) as c:` starts the cluster (or joins a running one);
    `c.partitions` lists the partitions that really exist (those asked for, or a joined cluster's
    own). State, spool and logs live in `folder`."""

    def __init__(self, folder: Path, partitions: tuple[str, ...] = ("debug",)):
        self.folder = Path(folder)
        self.wrote_conf = False
        self.wanted = tuple(partitions)
        self.partitions: list[str] = []
        self.started: list[subprocess.Popen] = []

    # ------------------------------------------------------------------------- commands
    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def responding(self) -> bool:
        try:
            out = self.run("scontrol", "ping", timeout=10, check=False).stdout
        except subprocess.TimeoutExpired:
            return False
        return "UP" in out

    @property
    def ctld_log(self) -> Path:
        return self.folder / "log" / "slurmctld.log"

    # ------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        if not self._munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn("munged", ["runuser", "-u", "munge", "--", _sbin("munged"), "--foreground"])
            self._wait(self._munge_ok, timeout, "munged")
        if CONF.exists() and self.responding():
            self.partitions = self.run("sinfo", "-h", "-o", "%R").stdout.split()
            return
        if CONF.exists() and not CONF.read_text().startswith(MARK):
            raise RuntimeError(f"{CONF} exists but no controller answers: start that cluster")
        self._write_conf()
        # -c: start from an empty state (a killed controller's saved state has ghost jobs).
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c"])
        self._wait(self.responding, timeout, "slurmctld")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost"])
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
        self.partitions = list(self.wanted)

    def stop(self) -> None:
        """Stop the daemons this object started (their process groups), newest first."""
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.started.clear()
        if self.wrote_conf:
            CONF.unlink(missing_ok=True)
            self.wrote_conf = False

    # ------------------------------------------------------------------------- internals
    def _spawn(self, name: str, cmd: list[str]) -> None:
        """Start a daemon in the foreground, in its own process group, output to log/NAME.out."""
        with open(self.folder / "log" / f"{name}.out", "ab") as log:
            self.started.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args for p in self.started if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; see {self.folder / 'log'}")
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout} s; see {self.folder / 'log'}")

    def _munge_ok(self) -> bool:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return bool(out) and all(state.rstrip("*") == "idle" for state in out)

    def _write_conf(self) -> None:
        hardware = subprocess.run(
            [_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        # "NodeName=<host> CPUs=2 ... RealMemory=24105" -> the same hardware named localhost
        hardware = " ".join(f for f in hardware.split() if not f.startswith("NodeName="))
        f = self.folder
        lines = [
            "ClusterName=iicrepro",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root",
            "MailProg=/bin/true",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=256",
            "MpiDefault=none",
            "ReturnToService=2",
            # ports 6817/6818 on 127.0.0.1 only
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            # finished jobs stay visible to squeue this long (the profile's status checks need it)
            "MinJobAge=300",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            f"NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
        ]
        for i, name in enumerate(self.wanted):
            default = "YES" if i == 0 else "NO"
            lines.append(
                f"PartitionName={name} Nodes=localhost Default={default} MaxTime=INFINITE State=UP"
            )
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(MARK + "\n".join(lines) + "\n")
        self.wrote_conf = True
