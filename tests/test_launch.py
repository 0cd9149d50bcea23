"""pipeline.launch without SLURM: env parsing, contradictions, run names (explicit env dicts)."""
import os

import pytest

from pipeline.config import load_config
from pipeline.launch import apply_cluster_env, default_run_name, in_slurm_allocation, slurm_layout
from pipeline.train import main


def srun_env(ntasks_per_node=2, nnodes=1, **extra):
    """The variables srun sets in each task of an `sbatch --nodes=N --ntasks-per-node=M` job."""
    env = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NNODES": str(nnodes),
        "SLURM_NTASKS": str(ntasks_per_node * nnodes), "SLURM_NTASKS_PER_NODE": str(ntasks_per_node),
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_ID": "0",
    }
    env.update(extra)
    return env


def cfg(*overrides):
    return load_config([], list(overrides))


def test_outside_slurm_nothing_changes():
    c = apply_cluster_env(cfg(), env={})
    assert (c.trainer.devices, c.trainer.num_nodes, c.run.name, c.run.dir) == ("auto", 1, "default", "runs/default")
    assert not in_slurm_allocation({})


def test_allocation_sets_devices_and_nodes():
    c = apply_cluster_env(cfg(), env=srun_env(ntasks_per_node=4, nnodes=2))
    assert (c.trainer.devices, c.trainer.num_nodes) == (4, 2)


@pytest.mark.parametrize("devices", ["2", "auto", "-1"])
def test_consistent_or_default_devices_accepted(devices):
    c = apply_cluster_env(cfg(f"trainer.devices={devices}"), env=srun_env(ntasks_per_node=2))
    assert c.trainer.devices == 2


def test_consistent_device_list_is_kept():
    c = apply_cluster_env(cfg("trainer.devices=[0,1]"), env=srun_env(ntasks_per_node=2))
    assert list(c.trainer.devices) == [0, 1]


@pytest.mark.parametrize("devices", ["1", "4", "[0]", "'0,1,2'"])
def test_contradicting_devices_raise_naming_the_key(devices):
    with pytest.raises(ValueError, match=r"trainer\.devices.*--ntasks-per-node"):
        apply_cluster_env(cfg(f"trainer.devices={devices}"), env=srun_env(ntasks_per_node=2))


def test_contradicting_num_nodes_raises_naming_the_key():
    with pytest.raises(ValueError, match=r"trainer\.num_nodes=3.*2 node"):
        apply_cluster_env(cfg("trainer.num_nodes=3"), env=srun_env(nnodes=2))
    # 1 is the default: not an explicit contradiction, it is filled in
    assert apply_cluster_env(cfg("trainer.num_nodes=1"), env=srun_env(nnodes=2)).trainer.num_nodes == 2


@pytest.mark.parametrize("name", ["bash", "interactive"])
def test_interactive_job_is_not_a_launch(name):
    # Mirrors Lightning's SLURMEnvironment.detect(): processes there are started by hand.
    env = srun_env(SLURM_JOB_NAME=name)
    assert not in_slurm_allocation(env)
    c = apply_cluster_env(cfg("trainer.devices=1"), env=env)
    assert (c.trainer.devices, c.run.name) == (1, "default")


def test_ntasks_without_per_node_is_refused():
    env = srun_env()
    del env["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(ValueError, match="--ntasks-per-node"):
        slurm_layout(env)
    env["SLURM_NTASKS"] = "1"
    assert slurm_layout(env) == (1, 1)


def test_multi_task_batch_step_without_srun_is_refused():
    env = srun_env()
    del env["SLURM_STEP_ID"]  # the batch script itself: one process where two are expected
    with pytest.raises(ValueError, match="srun"):
        apply_cluster_env(cfg(), env=env)
    assert apply_cluster_env(cfg(), env=env, require_srun=False).trainer.devices == 2
    single = srun_env(ntasks_per_node=1)
    del single["SLURM_STEP_ID"]  # one task (e.g. a W&B agent's run in the batch step) is fine
    assert apply_cluster_env(cfg(), env=single).trainer.devices == 1


def test_run_name_from_job_and_array():
    assert default_run_name(srun_env()) == "train-4242"
    assert default_run_name(srun_env(SLURM_JOB_NAME="train.sh")) == "train-4242"  # sbatch's default name
    assert default_run_name(srun_env(SLURM_JOB_NAME="my job/x")) == "my_job_x-4242"
    array = srun_env(SLURM_JOB_NAME="grid", SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID="3", SLURM_JOB_ID="104")
    assert default_run_name(array) == "grid-100_3"
    assert default_run_name({}) is None
    assert default_run_name(srun_env(SLURM_JOB_NAME="interactive")) is None


def test_run_name_under_wandb_agent_wins():
    env = srun_env(WANDB_SWEEP_ID="sw1", WANDB_RUN_ID="r9")
    assert default_run_name(env) == "sweep-sw1-r9"
    assert default_run_name({"WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "r9"}) == "sweep-sw1-r9"


def test_default_run_name_applied_and_explicit_name_wins():
    c = apply_cluster_env(cfg(), env=srun_env())
    assert (c.run.name, c.run.dir) == ("train-4242", "runs/train-4242")
    c = apply_cluster_env(cfg("run.name=mine"), env=srun_env())
    assert (c.run.name, c.run.dir) == ("mine", "runs/mine")
    c = apply_cluster_env(cfg("run.dir=/scratch/here"), env=srun_env())
    assert (c.run.name, c.run.dir) == ("train-4242", "/scratch/here")


def test_run_name_from_a_config_file_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  name: from-yaml\n")
    c = apply_cluster_env(load_config([f], []), env=srun_env())
    assert (c.run.name, c.run.dir) == ("from-yaml", "runs/from-yaml")


def test_cli_previews_and_reports_errors(monkeypatch, capsys):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "WANDB_SWEEP_ID", "WANDB_RUN_ID")):
            monkeypatch.delenv(k)
    assert main(["--dry-run", "trainer.max_steps=5"]) == 0
    assert "run.dir=runs/default" in capsys.readouterr().out
    assert main(["--dry-run", "trainer.bogus=1"]) == 2
    assert "trainer.bogus" in capsys.readouterr().err
