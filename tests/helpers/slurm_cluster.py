"""A throw-away SLURM cluster (munge + slurmctld + one slurmd per node) for the test suite: one node, the
machine itself, or several nodes on this one host (`nodes=2`: `slurmd -N n1`, `slurmd -N n2`).

Everything lives under one temporary directory: key, socket, config, state, spool and logs. Daemons
run in the foreground as our children, so teardown stops them by pid; nothing under /etc or /run is
touched and no system service is started. Client commands find the cluster through `SLURM_CONF` in
`cluster.env`, which is never exported into the test process itself.

    with SlurmCluster.start(tmp_dir) as cluster:
        job = cluster.sbatch(["--wait", "slurm/train.sh", "trainer.max_steps=30"])

Facts this relies on (Debian 12, Slurm 22.05, root, no systemd, no cgroups): `proctrack/linuxproc`
and `task/none` need no cgroup mounts; `MailProg=/bin/true` because no mailer is installed; munge
with its own key and socket (`AuthInfo=socket=...`) so a system munged, if any, is left alone.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.helpers.processes import pids_with_environment

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]
# Binaries live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message carries the daemon logs."""


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=SEARCH_PATH)


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if _which(b) is None]


def install_packages(timeout_s: float = 900) -> None:
    """apt-get the Debian packages (a fresh CI machine lacks them). Needs root and a package mirror.

    A temporary policy-rc.d forbids the packages' maintainer scripts from starting system services,
    so the install leaves no munged/slurmd running that the suite did not start itself.
    """
    if os.geteuid() != 0 or _which("apt-get") is None:
        raise ClusterError(
            f"SLURM binaries {missing_binaries()} are missing and cannot be installed here (need root and "
            f"apt-get to install {' '.join(PACKAGES)}); run `pytest -m 'not slurm'` to skip these tests"
        )
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# written by tests/helpers/slurm_cluster.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SEARCH_PATH)
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if r.returncode != 0:
                raise ClusterError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    if missing_binaries():
        raise ClusterError(f"installed {PACKAGES} but still missing {missing_binaries()}")


def free_port() -> int:
    # Bind-and-release: a small race with other processes, acceptable for a test cluster.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> Dict[str, str]:
    """`slurmd -C` of this machine, e.g. {'NodeName': 'vm', 'CPUs': '2', 'RealMemory': '24105', ...}."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split())


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<{e}>"


@dataclass
class Job:
    """A submitted job; `log` is its (first) output file."""
    id: str
    log: Path
    cluster: SlurmCluster

    def info(self) -> Dict[str, str]:
        return self.cluster.job_info(self.id)

    def state(self) -> str:
        return self.info().get("JobState", "UNKNOWN")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else f"<no log at {self.log}>"

    def daemon_lines(self, limit: int = 80) -> str:
        """The slurmctld / slurmd log lines that name this job (why a task was killed), the last `limit`."""
        pattern = re.compile(rf"(JobId=|StepId=|\[|job[_ ]?){self.id}(?!\d)", re.IGNORECASE)
        lines = []
        for f in sorted((self.cluster.root / "daemon-logs").glob("*.log")):
            lines += [f"{f.name}: {line}" for line in _tail(f, 400_000).splitlines() if pattern.search(line)]
        return "\n".join(lines[-limit:])


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    logs: Path  # job logs (pass --output under here)
    env: Dict[str, str]
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)

    # ----------------------------------------------------------------- start / stop
    nodes: List[str] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path, timeout_s: float = 60, nodes: int = 1) -> SlurmCluster:
        root = Path(root)
        for d in ("munge", "state", "spool", "daemon-logs", "logs"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # munged wants the socket directory traversable, not writable
        hw = node_hardware()
        conf = root / "slurm.conf"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.update(SLURM_CONF=str(conf), PATH=SEARCH_PATH, PYTEST_SLURM_CLUSTER=str(root))
        names = [hw["NodeName"]] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self = cls(root=root, conf=conf, logs=root / "logs", env=env, nodes=names)
        try:
            self._start_munge()
            conf.write_text(self._slurm_conf(hw))
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])
            slurmd = [_which("slurmd"), "-D", "-f", str(conf)]
            if nodes == 1:
                self._spawn("slurmd", [*slurmd, "-N", hw["NodeName"]])
            else:
                hosts = root / "hosts"
                hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n::1 localhost\n")
                for name in names:  # own mount namespace: /etc/hosts replaced for this slurmd and its jobs only
                    self._spawn(f"slurmd-{name}", ["unshare", "--mount", "sh", "-c",
                                                   'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                                                   *slurmd, "-N", name])
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn("munged", [
            _which("munged"), "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
            f"--log-file={self.root / 'daemon-logs' / 'munged.log'}",
        ])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise ClusterError("munged did not start:\n" + self.daemon_logs())
            time.sleep(0.05)

    def _slurm_conf(self, hw: Dict[str, str]) -> str:
        node = hw["NodeName"]
        hw_fields = " ".join(f"{k}={v}" for k, v in hw.items() if k not in ("NodeName", "UpTime"))
        logs = self.root / "daemon-logs"
        if len(self.nodes) == 1:
            node_lines = f"NodeName={node} NodeAddr=127.0.0.1 {hw_fields} State=UNKNOWN"
            per_node = ""
        else:  # one slurmd per node on this host: each its own port, spool, pid and log file (%n: node name)
            node_lines = "\n".join(f"NodeName={n} NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} "
                                   f"{hw_fields} State=UNKNOWN" for n in self.nodes)
            per_node = "-%n"
        return f"""\
# Generated by tests/helpers/slurm_cluster.py: a {len(self.nodes)}-node cluster under {self.root}
ClusterName=pytest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}{per_node}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd'}{per_node}.pid
SlurmctldLogFile={logs / 'slurmctld.log'}
SlurmdLogFile={logs / 'slurmd'}{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups in the test container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Quick scheduling and short grace periods keep the suite fast.
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=5
MinJobAge=600
# No GresTypes: the node has no GPUs, and --gpus-per-node=0 must still be accepted.
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.root / "daemon-logs" / f"{name}.stdout", "ab")
        # Own session: a Ctrl-C on pytest does not hit the daemons before teardown does. Parent-death
        # signal: should pytest itself be killed (no teardown), the kernel stops the daemons.
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        out.close()

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{name} exited with {p.returncode} during start-up:\n" + self.daemon_logs())
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = r.stdout.strip()
            if state and set(state.split()) == {"idle"} and len(state.split()) == len(self.nodes):
                return
            time.sleep(0.2)
        raise ClusterError(f"node not idle after {timeout_s}s (sinfo: {state!r}):\n" + self.daemon_logs())

    def stop(self) -> None:
        """Cancel jobs, stop the daemons by pid, then end any job process that outlived slurmd."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.3)
        for name in [*(n for n in self.procs if n.startswith("slurmd")), "slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self._stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _stray_pids(self) -> List[int]:
        """Processes carrying this cluster's marker in their environment (slurmstepd, job tasks)."""
        mine = {os.getpid(), os.getppid()}
        return [pid for pid in pids_with_environment(f"PYTEST_SLURM_CLUSTER={self.root}") if pid not in mine]

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- clients
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: Sequence[str], name: str = "job", cwd: Optional[Path] = None,
               env: Optional[Dict[str, str]] = None, wait: bool = True, timeout: float = 300) -> Job:
        """Submit with the log in `self.logs/<name>-<jobid>.out` (arrays: `<name>-<arrayid>_<task>.out`).

        wait=True returns once the job (every task of an array) has left the queue. It polls
        squeue every 0.25 s instead of `sbatch --wait`, whose 10 s poll would dominate these tests.
        The job's own exit status is left to the caller, who asserts on it and prints the log.
        """
        array = any(a.startswith("--array") for a in args)
        out = self.logs / ("%x-%A_%a.out" if array else "%x-%j.out")
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out}", *args]
        r = self.run(cmd, check=False, cwd=cwd, env=env or self.env)
        m = re.match(r"(\d+)", r.stdout.strip())
        if r.returncode != 0 or not m:
            raise ClusterError(f"sbatch failed ({r.returncode}): {r.stdout}\n{r.stderr}\n" + self.daemon_logs())
        job = Job(id=m.group(1), log=self.logs / f"{name}-{m.group(1)}.out", cluster=self)
        if wait:
            self.wait_gone(job.id, timeout)
        return job

    def queued(self, job_id: str) -> List[str]:
        """`<id> <state>` lines of a job (or an array's tasks) still pending or running."""
        r = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%i %T"], check=False)
        return r.stdout.split("\n") if r.returncode == 0 and r.stdout.strip() else []

    def wait_gone(self, job_id: str, timeout_s: float = 300) -> None:
        self.wait_for(lambda: not self.queued(job_id), timeout_s, f"job {job_id} to finish", interval=0.25)

    def release_requeued(self, job_id: str) -> None:
        """Start a requeued job (SLURM holds it back ~2 min) soon, but not within the second its previous run was
        killed: slurmd revokes that run's credential and compares times in whole seconds, so a relaunch in the same
        second is refused ("Job credential revoked", the job FAILED: seen once under the suite's load)."""
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"])

    def job_info(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (first record for an array); {} once the record is gone."""
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.splitlines()[0].split() if "=" in kv)

    def wait_for(self, predicate, timeout_s: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")

    def daemon_logs(self) -> str:
        parts = []
        for f in sorted((self.root / "daemon-logs").glob("*")):
            parts.append(f"===== {f.name} =====\n{_tail(f)}")
        return "\n".join(parts)
