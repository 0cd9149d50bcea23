"""The SLURM scripts on a real one-node cluster that this module starts (tests/helpers/slurm_cluster.py).

    python -m pytest tests/test_slurm.py          # installs slurm + munge with apt-get if missing (root)
    python -m pytest -m "not slurm"               # skips them

Jobs are tiny CPU runs (2 gloo DDP ranks on a 2-core node). Each test submits from its own tmp
directory, so run directories (runs/<job name>-<job id>) land there; the digits shards are prepared
once per session (conftest's digits_root). A failed assertion prints the job log; a cluster that
does not start, the daemon logs.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.run import TINY as CONFTEST_TINY
from tests.helpers.slurm_cluster import ClusterError, SlurmCluster, free_port, install_packages, missing_binaries
from tests.helpers.wandb_records import check_history

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "slurm" / "train.sh"
GRID_SH = REPO / "slurm" / "grid.sh"
SWEEP_FILE = REPO / "configs" / "sweep.yaml"

# The suite's shrunk config (tests/helpers/run.py), every step logged, validation short: jobs run as
# 2 gloo ranks with the default loader workers on the 2-core node.
# The W&B mode is left to each job: grid.sh sets offline itself and the tests check it.
TINY = [*(a for a in CONFTEST_TINY if not a.startswith("logger.wandb.mode=")),
        "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2"]
# The templates ask for a GPU node's resources; override them to fit the 2-core test node.
CPU_DDP = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=1G", "--time=10"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    """One cluster for the session; stopped (daemons killed by pid) even when tests fail."""
    if missing_binaries():
        install_packages()
    # Short path: the munge socket path must fit a unix socket name (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="pytest-slurm-", dir="/tmp"))
    try:
        cluster = SlurmCluster.start(root)
    except ClusterError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start the test SLURM cluster: {e}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def python_bin(tmp_path_factory) -> Path:
    """A directory whose `python` is this interpreter: the scripts (and W&B's agent) run `python`.

    A wrapper, not a symlink: a virtual environment is found next to the path an interpreter was
    started by, so a symlink to a venv's python elsewhere starts the base interpreter without the
    venv's packages (ModuleNotFoundError in every job)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    wrapper.chmod(0o755)
    return bin_dir


def script_env(base: dict, python_bin: Path) -> dict:
    """`base` without the caller's SLURM/W&B variables, with this repo and interpreter first."""
    env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "WANDB_"))}
    env.update(PATH=os.pathsep.join([str(python_bin), base.get("PATH", "")]), WANDB_SILENT="true",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])))
    return env


@pytest.fixture
def job_env(slurm_cluster, python_bin):
    """Environment for sbatch, exported into the job: the cluster, repo, interpreter, a free DDP port."""
    return dict(script_env(slurm_cluster.env, python_bin), SLURM_CONF=slurm_cluster.env["SLURM_CONF"],
                MASTER_PORT=str(free_port()), SWEEP_FILE=str(SWEEP_FILE))


def explain(job) -> str:
    info = job.info()
    return (f"\n--- job {job.id}: {info.get('JobState')} exit {info.get('ExitCode')} "
            f"restarts {info.get('Restarts')} ---\n{job.log_text()[-12000:]}"
            + (f"\n--- daemon log lines of job {job.id} ---\n{job.daemon_lines()}"
               if info.get("JobState") != "COMPLETED" else ""))


def read_metrics(run_dir: Path):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_steps(rows) -> list:
    """Steps of the rows that carry a training loss (one per optimizer step with log_every_n_steps=1)."""
    key = next(k for k in rows[0] if k.startswith("train/loss"))
    return [int(float(r["step"])) for r in rows if r.get(key)]


def saved_config(run_dir: Path):
    from pipeline.config import load_config
    return load_config([run_dir / "config.yaml"])


# ----------------------------------------------------------------------------- cluster and launch
@pytest.mark.slurm
def test_cpu_node_allocation_sets_devices_and_nodes(slurm_cluster, job_env, tmp_path):
    """--gpus-per-node=0 is accepted on the GPU-less node, and srun tasks see the allocation."""
    probe = ("from pipeline.config import load_config; from pipeline.launch.cluster import apply_cluster_env as a; "
             "c = a(load_config([], [])); print('LAYOUT', c.trainer.devices, c.trainer.num_nodes, c.run.name)")
    script = tmp_path / "probe.sh"
    script.write_text(f"#!/bin/bash\nsrun python -c \"{probe}\"\n"
                      f"python -c \"{probe}\" || echo BATCH-STEP-REFUSED\n")
    job = slurm_cluster.sbatch([*CPU_DDP, str(script)], name="probe", cwd=tmp_path, env=job_env)
    log = job.log_text()
    assert job.state() == "COMPLETED", explain(job)
    assert log.count(f"LAYOUT 2 1 probe-{job.id}") == 2, explain(job)  # one line per rank
    assert "BATCH-STEP-REFUSED" in log and "not started by srun" in log, explain(job)


@pytest.mark.slurm
def test_contradicting_devices_stop_the_job_with_a_message(slurm_cluster, job_env, tmp_path):
    job = slurm_cluster.sbatch([*CPU_DDP, str(TRAIN_SH), *TINY, "trainer.devices=1"],
                               name="contra", cwd=tmp_path, env=job_env)
    assert job.state() == "FAILED", explain(job)
    assert "trainer.devices=1 contradicts the SLURM allocation" in job.log_text(), explain(job)
    assert not (tmp_path / "runs").exists(), explain(job)  # stopped before any rank started


# ----------------------------------------------------------------------------- training jobs
@pytest.mark.slurm
def test_train_sh_trains_with_two_ddp_ranks(slurm_cluster, job_env, digits_root, tmp_path):
    """sbatch --gpus-per-node=0 --ntasks-per-node=2 slurm/train.sh: 2 gloo ranks to max_steps."""
    steps = 30
    job = slurm_cluster.sbatch([*CPU_DDP, str(TRAIN_SH), *TINY, f"data.root={digits_root}",
                                f"trainer.max_steps={steps}", "logger.wandb.mode=disabled"],
                               name="ddp", cwd=tmp_path, env=job_env)
    assert job.state() == "COMPLETED", explain(job)
    run_dir = tmp_path / "runs" / f"ddp-{job.id}"  # the default run name: job name + job id
    log = job.log_text()
    assert f"run.dir={Path('runs') / f'ddp-{job.id}'} trainer.devices=2 trainer.num_nodes=1" in log, explain(job)
    # both ranks joined the gloo group (rank zero says so, once: rank 1's own start-up line is not printed)
    assert "Starting with 2 processes" in log and log.count("Initializing distributed") == 1, explain(job)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), explain(job)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    assert saved_config(run_dir).trainer.devices == 2
    trained = train_steps(read_metrics(run_dir))
    assert len(trained) == len(set(trained)) and max(trained) == steps - 1, explain(job)


@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes(slurm_cluster, job_env, digits_root, tmp_path):
    """USR1 mid-run: checkpoint, requeue, resume in the same run dir and W&B run, no step twice."""
    steps = 200  # the signal follows the first checkpoint (step 20): it lands mid-run
    # streamed through the default 2 loader workers per rank (data.cache=none, as any split too large to hold
    # is): scancel -s USR1 signals them too, the case that once crashed or hung a preempted job
    job = slurm_cluster.sbatch([*CPU_DDP, str(TRAIN_SH), *TINY, f"data.root={digits_root}", "data.cache=none",
                                f"trainer.max_steps={steps}", "checkpoint.every_n_steps=20",
                                "trainer.val_check_interval=1000", "logger.wandb.mode=offline"],
                               name="preempt", cwd=tmp_path, env=job_env, wait=False)
    run_dir = tmp_path / "runs" / f"preempt-{job.id}"
    try:
        def training():  # under way once the first periodic checkpoint exists
            assert job.state() in ("PENDING", "CONFIGURING", "RUNNING"), explain(job)
            return (run_dir / "checkpoints" / "last.ckpt").is_file()

        slurm_cluster.wait_for(training, 120, "the first checkpoint", interval=0.1)
        slurm_cluster.run(["scancel", "-s", "USR1", job.id])
        # Lightning requeues the job (PENDING, held back ~2 min by SLURM): release it now.
        slurm_cluster.wait_for(lambda: job.info().get("Restarts") == "1" and job.state() == "PENDING", 60,
                               "the job to be requeued")
        slurm_cluster.release_requeued(job.id)
        slurm_cluster.wait_gone(job.id, 240)
    except (TimeoutError, ClusterError) as e:
        pytest.fail(f"{e}{explain(job)}")

    info, log = job.info(), job.log_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", explain(job)
    assert "restart 0" in log and "restart 1" in log, explain(job)  # one log, appended by both parts
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, explain(job)
    saved = torch.load(hpc[0], weights_only=False)["global_step"]
    assert 0 < saved < steps, explain(job)
    # from hpc_ckpt_1, or from last.ckpt when the stop fell on a checkpoint step (the stopped part now ends
    # normally, committing it after hpc_ckpt_1): the same step either way
    assert re.search(rf"resuming from \S*/(hpc_ckpt_1|checkpoints/last)\.ckpt \(step {saved}\)", log), explain(job)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps

    # No step trained twice, none lost: each optimizer step has exactly one training row.
    trained = train_steps(read_metrics(run_dir))
    assert sorted(trained) == list(range(steps)), explain(job)

    # One W&B run across both parts: one persisted id, and every offline run dir carries it.
    run_id = (run_dir / "wandb_run_id.txt").read_text().split()[0]
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts), (parts, explain(job))
    # ... whose records (W&B's own reader) hold one history: _step increasing across the requeue, and every
    # metrics.csv row in it, the preempted part's last training rows included (committed before the requeue)
    check_history(run_dir, n_segments=2)


@pytest.mark.slurm
def test_grid_array_trains_one_beta_per_task(slurm_cluster, job_env, digits_root, tmp_path):
    """slurm/grid.sh as a 2-task array: task i trains point i of configs/sweep.yaml."""
    from pipeline.launch.sweep import grid_points, load_sweep

    betas = [p["objective.beta"] for p in grid_points(load_sweep(SWEEP_FILE))][:2]
    job = slurm_cluster.sbatch(["--array=0-1", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1",
                                "--mem=1G", "--time=10", str(GRID_SH), *TINY, f"data.root={digits_root}",
                                "trainer.max_steps=30"], name="grid", cwd=tmp_path, env=job_env)
    for task, beta in enumerate(betas):
        log = slurm_cluster.logs / f"grid-{job.id}_{task}.out"
        shown = log.read_text(errors="replace")[-8000:] if log.exists() else f"<no {log}>"
        run_dir = tmp_path / "runs" / f"grid-{job.id}_{task}"
        assert (run_dir / "checkpoints" / "last.ckpt").is_file(), shown
        cfg = saved_config(run_dir)
        assert cfg.objective.beta == float(beta), shown
        assert (cfg.logger.wandb.mode, cfg.logger.wandb.group) == ("offline", "beta-sweep"), shown
        assert list((run_dir / "wandb").glob("offline-run-*")), shown


@pytest.mark.slurm
def test_wandb_agent_command_trains_its_beta(slurm_cluster, job_env, digits_root, tmp_path, monkeypatch):
    """The exact command wandb's agent builds for a point of configs/sweep.yaml, run as a job."""
    from test_sweep import wandb_agent_command

    from pipeline.launch.sweep import load_sweep, point

    sweep = load_sweep(SWEEP_FILE)
    # Fixed config goes before ${args_no_hyphens}, as configs/sweep.yaml says; here: shrink the run.
    i = sweep["command"].index("${args_no_hyphens}")
    sweep["command"][i:i] = [*TINY, f"data.root={digits_root}", "trainer.max_steps=30", "logger.wandb.mode=offline"]
    index = 3
    argv = wandb_agent_command(sweep, point(sweep, index), tmp_path / "agent", monkeypatch)
    assert argv[:4] == ["/usr/bin/env", "python", "-m", "pipeline.train"] and argv[-1] == "objective.beta=4"
    # The agent's own variables (its run id names the run directory); the agent runs in the batch step.
    agent_env = dict(job_env, WANDB_SWEEP_ID="sw1", WANDB_RUN_ID="run1",
                     WANDB_SWEEP_PARAM_PATH=os.environ["WANDB_SWEEP_PARAM_PATH"])
    script = tmp_path / "agent.sh"
    script.write_text(f"#!/bin/bash\nexec {shlex.join(argv)}\n")
    job = slurm_cluster.sbatch(["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=1G",
                                "--time=10", str(script)], name="agent", cwd=tmp_path, env=agent_env)
    assert job.state() == "COMPLETED", explain(job)
    run_dir = tmp_path / "runs" / "sweep-sw1-run1"
    assert saved_config(run_dir).objective.beta == 4.0, explain(job)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), explain(job)
    # W&B records it as the agent's run (wandb ignores any other id under a sweep).
    assert [p.name.split("-")[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == ["run1"], explain(job)


# ----------------------------------------------------------------------------- without SLURM
@pytest.mark.slow
def test_train_sh_runs_locally_without_slurm(digits_root, python_bin, tmp_path):
    """`bash slurm/train.sh key=value ...` on a machine without SLURM: plain python, no srun."""
    env = script_env(dict(os.environ), python_bin)
    r = subprocess.run(["bash", str(TRAIN_SH), *TINY, f"data.root={digits_root}", "trainer.max_steps=5",
                        "logger.wandb.mode=disabled", "run.name=local"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (tmp_path / "runs" / "local" / "checkpoints" / "last.ckpt").is_file(), r.stdout[-4000:] + r.stderr[-4000:]


@pytest.mark.parametrize("script", ["train.sh", "grid.sh", "sweep.sh"])
def test_sbatch_templates(script):
    """Parse as bash; GPUs asked per node (so --gpus-per-node=0 fits CPU nodes), never by --gres."""
    path = REPO / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    names = {d.split("=")[0] for d in directives}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--mem", "--time",
            "--output"} <= names and "--gres" not in names
    if script != "sweep.sh":  # a requeued agent would take a new point; see sweep.sh
        assert {"--signal=USR1@90", "--requeue", "--open-mode=append"} <= set(directives)
