"""`slurm/train.sh` on a real two-node SLURM cluster (tests/helpers/slurm_cluster.py, nodes n1 and n2 on this host):
2 nodes x 2 gloo ranks with the default loader workers and data cache, as a user submits it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from test_slurm import CPU_DDP, TINY, TRAIN_SH, explain, python_bin, read_metrics, script_env, train_steps  # noqa: F401 (fixture)

from tests.helpers.processes import pids_with_environment
from tests.helpers.run import REPO
from tests.helpers.slurm_cluster import ClusterError, SlurmCluster, free_port, install_packages, missing_binaries

PROBES = REPO / "tests" / "helpers" / "probes"


@pytest.fixture(scope="module")
def two_nodes():
    if missing_binaries():
        install_packages()
    root = Path(tempfile.mkdtemp(prefix="pytest-slurm2-", dir="/tmp"))
    try:
        cluster = SlurmCluster.start(root, nodes=2)
    except ClusterError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start the two-node test cluster: {e}", pytrace=False)
    yield cluster
    cluster.stop()
    assert not cluster._stray_pids(), "a job process outlived the cluster"
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slurm
def test_two_nodes_by_two_ranks_train_and_split_the_data_exactly(two_nodes, python_bin, digits_root,  # noqa: F811
                                                                 tmp_path):
    steps, batch = 12, 64
    keys_dir = tmp_path / "keys"
    env = dict(script_env(two_nodes.env, python_bin), SLURM_CONF=two_nodes.env["SLURM_CONF"],
               MASTER_PORT=str(free_port()), KEY_PROBE_OUT=str(keys_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(PROBES), env["PYTHONPATH"]])
    job = two_nodes.sbatch(["--nodes=2", *CPU_DDP, str(TRAIN_SH), *TINY, f"data.root={digits_root}",
                            f"trainer.max_steps={steps}", "logger.wandb.mode=disabled"],
                           name="nodes", cwd=tmp_path, env=env, timeout=400)
    log = job.log_text()
    assert job.state() == "COMPLETED", explain(job)
    assert "trainer.devices=2 trainer.num_nodes=2" in log and " x 2 nodes" in log, explain(job)
    # Lightning's per-rank start-up lines and warnings: once per job, not once per rank
    assert log.count("Initializing distributed") == 1 and log.count("SLURM auto-requeueing enabled") <= 1, explain(job)
    assert "sync_dist" not in log, explain(job)
    run_dir = tmp_path / "runs" / f"nodes-{job.id}"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    trained = train_steps(read_metrics(run_dir))
    assert sorted(trained) == list(range(steps)), explain(job)

    ranks = [json.loads((keys_dir / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["world"] for r in ranks] == [4] * 4
    assert sorted(r["node"] for r in ranks) == ["n1", "n1", "n2", "n2"]  # two ranks on each node
    assert all(len(r["rows"]) == steps for r in ranks)  # the same number of batches on every rank
    manifest = json.loads((digits_root / "manifest.json").read_text())
    per_epoch = manifest["splits"]["train"]["total"] // (4 * batch)  # steps in one epoch, every rank
    epochs = defaultdict(list)
    for r in ranks:
        assert [step for step, _ in r["rows"]] == list(range(steps))
        for step, keys in r["rows"]:
            assert len(keys) == batch
            epochs[step // per_epoch].extend(keys)
    for epoch, keys in epochs.items():  # within an epoch no sample twice across the 4 ranks
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample was read twice"
    full = [keys for epoch, keys in epochs.items() if len(keys) == per_epoch * 4 * batch]
    assert full, "no complete epoch"


@pytest.mark.slurm
def test_two_node_preemption_requeues_resumes_and_logs_no_traceback(two_nodes, python_bin, digits_root,  # noqa: F811
                                                                   tmp_path):
    """scancel -s USR1 on a 2 x 2 job streaming through the default loader workers: every rank stops at the
    same batch, one checkpoint, requeue, resume, COMPLETED, each step once; and a routine requeue reads as
    healthy: no traceback and no worker-killed error anywhere in the job's log."""
    steps = 100  # the signal follows the first checkpoint (step 20); the requeued part trains the rest
    env = dict(script_env(two_nodes.env, python_bin), SLURM_CONF=two_nodes.env["SLURM_CONF"],
               MASTER_PORT=str(free_port()))
    job = two_nodes.sbatch(["--nodes=2", *CPU_DDP, str(TRAIN_SH), *TINY, f"data.root={digits_root}", "data.cache=none",
                            f"trainer.max_steps={steps}", "checkpoint.every_n_steps=20",
                            "trainer.val_check_interval=1000", "logger.wandb.mode=offline"],
                           name="preempt2", cwd=tmp_path, env=env, wait=False)
    run_dir = tmp_path / "runs" / f"preempt2-{job.id}"
    try:
        two_nodes.wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), 240, "the first checkpoint",
                           interval=0.1)
        two_nodes.run(["scancel", "-s", "USR1", job.id])
        two_nodes.wait_for(lambda: job.info().get("Restarts") == "1" and job.state() == "PENDING", 90,
                           "the job to be requeued")
        two_nodes.release_requeued(job.id)
        two_nodes.wait_gone(job.id, 300)
    except (TimeoutError, ClusterError) as e:
        pytest.fail(f"{e}{explain(job)}")
    info, log = job.info(), job.log_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", explain(job)
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, explain(job)
    saved = torch.load(hpc[0], weights_only=True)["global_step"]
    assert 0 < saved < steps and f"(step {saved})" in log, explain(job)
    assert sorted(train_steps(read_metrics(run_dir))) == list(range(steps)), explain(job)
    run_id = (run_dir / "wandb_run_id.txt").read_text().split()[0]
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts), (parts, explain(job))
    for noise in ("Traceback", "is killed by signal", "Exception ignored", "Connection closed by peer"):
        assert noise not in log, f"{noise!r} in the log of a routine requeue:{explain(job)}"


def _task_pids(job_id: str, node: str) -> list[int]:
    """The job's training processes (ranks and their loader workers) on one node, found by their environment."""
    pids = []
    for pid in pids_with_environment(f"SLURM_JOB_ID={job_id}", f"SLURMD_NODENAME={node}"):
        try:
            if b"pipeline.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:  # ended meanwhile
            continue
    return pids


@pytest.mark.slurm
def test_a_lost_node_ends_the_job_within_seconds_and_a_resubmission_resumes(two_nodes, python_bin, digits_root,  # noqa: F811
                                                                            tmp_path):
    """Every process of node n2 SIGKILLed mid-run (a node lost): the ranks on n1 do not wait for their time limit;
    the job ends within seconds, and the same command submitted again resumes from the last checkpoint."""
    import signal
    import time

    steps = 100  # the kill follows the first checkpoint (step 20); the resubmission trains the rest
    env = dict(script_env(two_nodes.env, python_bin), SLURM_CONF=two_nodes.env["SLURM_CONF"],
               MASTER_PORT=str(free_port()))
    args = ["--nodes=2", *CPU_DDP, str(TRAIN_SH), *TINY, f"data.root={digits_root}", "run.name=lost",
            f"trainer.max_steps={steps}", "checkpoint.every_n_steps=20", "trainer.val_check_interval=1000",
            "logger.wandb.mode=disabled"]
    job = two_nodes.sbatch(args, name="lost", cwd=tmp_path, env=env, wait=False)
    run_dir = tmp_path / "runs" / "lost"
    try:
        two_nodes.wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), 240, "the first checkpoint",
                           interval=0.1)
        victims = _task_pids(job.id, "n2")
        assert victims, explain(job)
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        two_nodes.wait_gone(job.id, 120)
        ended_in = time.monotonic() - killed
    except (TimeoutError, ClusterError) as e:
        pytest.fail(f"{e}{explain(job)}")
    assert job.state() != "COMPLETED" and ended_in < 30, (ended_in, explain(job))
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved < steps
    again = two_nodes.sbatch(args, name="lost", cwd=tmp_path, env=dict(env, MASTER_PORT=str(free_port())),
                             timeout=400)
    log = again.log_text()
    assert again.state() == "COMPLETED", explain(again)
    assert f"(step {saved})" in log, explain(again)
    assert sorted(train_steps(read_metrics(run_dir))) == list(range(steps)), explain(again)
