"""pipeline.launch.cluster without SLURM: env parsing, contradictions, run names (explicit env dicts)."""
import os
import re

import pytest

from pipeline.config import load_config
from pipeline.launch.cluster import apply_cluster_env, default_run_name, in_slurm_allocation, slurm_layout
from pipeline.training.train import main


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
    assert (c.trainer.devices, c.trainer.num_nodes, c.run.name, c.run.dir) == (None, 1, "default", "runs/default")
    assert not in_slurm_allocation({})


def test_allocation_sets_devices_and_nodes():
    c = apply_cluster_env(cfg(), env=srun_env(ntasks_per_node=4, nnodes=2))
    assert (c.trainer.devices, c.trainer.num_nodes) == (4, 2)


@pytest.mark.parametrize("devices", ["2", "auto", "-1", "null"])
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


# ----------------------------------------------------------------------------- names from the config
@pytest.fixture
def no_launch_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "WANDB_SWEEP_ID", "WANDB_RUN_ID")):
            monkeypatch.delenv(k)


def run_dir_of(argv, capsys) -> str:
    assert main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out.split("run.dir=")[1].split()[0]


def test_default_run_name_comes_from_the_config_files_and_overrides(no_launch_env, capsys):
    assert run_dir_of([], capsys) == "runs/default"
    assert run_dir_of(["trainer.max_steps=60"], capsys) == "runs/default"  # extending a run: same directory
    beta8 = run_dir_of(["configs/dsprites_beta.yaml", "objective.beta=8"], capsys)
    assert beta8 == "runs/dsprites_beta-objective.beta=8"
    # keys that say how long, where or on what the run goes stay out of the name: the same directory resumes
    assert run_dir_of(["configs/dsprites_beta.yaml", "objective.beta=8", "trainer.max_steps=10", "data.num_workers=0",
                       "trainer.devices=1", "logger.wandb.mode=offline", "checkpoint.every_n_steps=7"], capsys) == beta8
    # an override equal to what the file says changes nothing; the order of overrides does not matter
    assert run_dir_of(["configs/dsprites_beta.yaml", "objective.beta=4"], capsys) == "runs/dsprites_beta"
    assert run_dir_of(["optim.lr=0.01", "model.hidden_dims=[64, 32]"], capsys) == \
        run_dir_of(["model.hidden_dims=[64, 32]", "optim.lr=0.01"], capsys) == \
        "runs/default-model.hidden_dims=64_32-optim.lr=0.01"  # sanitised for a directory name
    assert run_dir_of(["configs/debug.yaml", "configs/cyclical.yaml"], capsys) == "runs/debug+cyclical"


def test_long_derived_names_are_cut_and_stay_distinct(no_launch_env, capsys):
    a = run_dir_of([f"model.hidden_dims=[{','.join(['512'] * 30)}]"], capsys)
    b = run_dir_of([f"model.hidden_dims=[{','.join(['512'] * 31)}]"], capsys)
    assert a != b and len(a) <= len("runs/") + 80 and len(b) <= len("runs/") + 80


def test_explicit_and_launch_names_win_over_the_derived_one(no_launch_env, monkeypatch, capsys):
    assert run_dir_of(["objective.beta=8", "run.name=mine"], capsys) == "runs/mine"
    assert run_dir_of(["objective.beta=8", "run.dir=/scratch/x"], capsys) == "/scratch/x"
    for k, v in srun_env(ntasks_per_node=1).items():
        monkeypatch.setenv(k, v)
    # the job's name: a requeue finds its directory
    assert run_dir_of(["configs/dsprites_beta.yaml", "objective.beta=8"], capsys) == "runs/train-4242"


TORCHRUN_ENV = {"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4",
                "TORCHELASTIC_RUN_ID": "exp 7"}


def test_torchrun_sets_devices_nodes_and_a_run_name_every_node_shares():
    from pipeline.config import load_config
    from pipeline.launch.cluster import apply_cluster_env, describe, torchrun_layout

    assert torchrun_layout(TORCHRUN_ENV) == (2, 2)
    cfg = apply_cluster_env(load_config([], []), env=TORCHRUN_ENV)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.run.name) == (2, 2, "torchrun-exp_7")
    assert "(torchrun)" in describe(cfg, env=TORCHRUN_ENV)
    plain = apply_cluster_env(load_config([], []), env={**TORCHRUN_ENV, "TORCHELASTIC_RUN_ID": "none"})
    assert plain.run.name == "default"  # no --rdzv-id: nothing shared to name the run by


@pytest.mark.parametrize("override, message", [
    ("trainer.devices=1", "trainer.devices=1 contradicts torchrun of 2 process(es) per node"),
    ("trainer.num_nodes=3", "trainer.num_nodes=3 contradicts torchrun of 2 node(s)"),
])
def test_torchrun_contradictions_are_refused(override, message):
    from pipeline.config import load_config
    from pipeline.launch.cluster import apply_cluster_env

    with pytest.raises(ValueError, match=re.escape(message)):
        apply_cluster_env(load_config([], [override]), env=TORCHRUN_ENV)


def test_uneven_torchrun_layout_is_refused():
    from pipeline.launch.cluster import torchrun_layout

    with pytest.raises(ValueError, match="not a multiple of LOCAL_WORLD_SIZE"):
        torchrun_layout({**TORCHRUN_ENV, "WORLD_SIZE": "3"})


def test_torchrun_restarts_with_the_shared_store_are_refused_naming_the_fix():
    from pipeline.launch.cluster import torchrun_layout

    restarts = {**TORCHRUN_ENV, "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with pytest.raises(ValueError, match="--max-restarts=3 .*TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        torchrun_layout(restarts)
    assert torchrun_layout({**restarts, "TORCHELASTIC_USE_AGENT_STORE": "False"}) == (2, 2)  # the variable set
    assert torchrun_layout({**restarts, "TORCHELASTIC_MAX_RESTARTS": "0"}) == (2, 2)  # no restarts: no problem


def test_peer_lost_is_found_behind_a_later_error():
    from pipeline.training.train import _peer_lost

    try:
        try:
            raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:63687")
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 29707) is killed by signal: Terminated.")  # noqa: B904 (the chain is the point)
    except RuntimeError as e:
        assert _peer_lost(e)
    assert not _peer_lost(RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated."))


@pytest.mark.parametrize("override, env, chosen, why", [
    ((), {}, 1, "default; trainer.devices=auto for all 8"),
    (("trainer.devices=auto",), {}, 8, "trainer.devices=auto: all of this node"),
    (("trainer.devices=-1",), {}, 8, "trainer.devices=auto: all of this node"),
    (("trainer.devices=2",), {}, 2, "trainer.devices=2"),
    (("trainer.devices=[0,3,5]",), {}, 3, "trainer.devices=[0, 3, 5]"),
    ((), srun_env(ntasks_per_node=4, nnodes=2), 4, "SLURM allocation, --ntasks-per-node"),
    ((), TORCHRUN_ENV, 2, "torchrun --nproc-per-node"),
], ids=["default", "auto", "minus-one", "count", "list", "slurm", "torchrun"])
def test_devices_default_to_one_unless_asked_or_allocated(override, env, chosen, why):
    # a node reporting 8 devices: only an explicit auto / -1 (or the launch's allocation) takes more than one
    from pipeline.launch.cluster import choose_devices, trainer_devices

    c = apply_cluster_env(cfg(*override), env=env)
    assert choose_devices(c.trainer.devices, available=8, env=env) == (chosen, why)
    if not env:
        assert trainer_devices(c.trainer.devices) == (1 if not override else c.trainer.devices)
    assert choose_devices(None, available=1, env={}) == (1, "default")  # one device: nothing to say


@pytest.mark.parametrize("override, chosen", [((), 1), (("trainer.devices=auto",), 8)])
def test_lightning_takes_one_of_eight_gpus_by_default(override, chosen, monkeypatch):
    # CUDA faked at the count Lightning asks: the Trainer is built, nothing runs on it
    import lightning.pytorch as pl
    import torch

    from pipeline.launch.cluster import trainer_devices
    from pipeline.training.console import devices_why

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "LOCAL_WORLD_SIZE", "GROUP_RANK"))]:
        monkeypatch.delenv(k)
    c = apply_cluster_env(cfg(*override), env={})
    trainer = pl.Trainer(accelerator=c.trainer.accelerator, devices=trainer_devices(c.trainer.devices), logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    assert (type(trainer.accelerator).__name__, trainer.num_devices) == ("CUDAAccelerator", chosen)
    assert devices_why(c.trainer.devices, trainer) == ("default; trainer.devices=auto for all 8" if chosen == 1 else
                                                       "trainer.devices=auto: all of this node")
