"""Launch environment: take devices, nodes and a stable run name from SLURM or torchrun (or a W&B agent).

`pipeline.training.train` calls `apply_cluster_env(cfg)` right after loading the config, so that:

- under an sbatch/srun allocation `trainer.devices` = tasks per node and `trainer.num_nodes` =
  nodes: Lightning trusts both and a mismatch with the allocation hangs or silently under-uses
  it. An explicit contradicting value (anything but null, "auto"/-1 and 1) stops with a
  ValueError that names the key;
- under torchrun (`torchrun --nnodes=N --nproc-per-node=P ... -m pipeline.train`, Kubernetes and cloud VMs
  without SLURM) the same from its LOCAL_WORLD_SIZE and WORLD_SIZE: P devices, N nodes;
- a run left at the default name gets one that survives a requeue: `<job name>-<job id>`, or
  `<job name>-<array job id>_<task id>` for an array task, or `sweep-<sweep id>-<run id>` under a
  W&B sweep agent, or `torchrun-<rdzv id>` under torchrun with `--rdzv-id`. The same run directory means a
  requeued job (or a group torchrun restarts) finds its checkpoint and W&B run.

Outside both, `trainer.devices` left at null trains on one device (`trainer_devices`): Lightning's "auto" takes
every GPU of the node and so changes the global batch with the machine; "auto" or -1, given, still means all.

Preview what a job would run with (slurm/train.sh prints it in the batch step before `srun`):

    python -m pipeline.train --dry-run [CONFIG.yaml ...] [key=value ...]
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Tuple

from pipeline.launch.naming import DEFAULT_RUN_NAME, name_run

# Job names Lightning treats as "not a SLURM launch" (SLURMEnvironment.detect()): an interactive
# `srun --pty bash` or `salloc` shell where processes are started by hand.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
DEFAULT_DEVICES = (None, "auto", -1, "-1")  # not a count: filled in from the allocation (null alone: 1 outside one)
DEFAULT_NUM_NODES = 1


def in_slurm_allocation(env: Mapping[str, str] = os.environ) -> bool:
    """True inside an sbatch/srun allocation, mirroring Lightning's `SLURMEnvironment.detect()`."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES


def in_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """True in a process torchrun started, mirroring Lightning's `TorchElasticEnvironment.detect()`."""
    return all(v in env for v in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def torchrun_layout(env: Mapping[str, str] = os.environ) -> Tuple[int, int]:
    """(processes per node, nodes) of a torchrun launch: one process per device."""
    per_node = _leading_int(env["LOCAL_WORLD_SIZE"], "LOCAL_WORLD_SIZE")
    world = _leading_int(env.get("WORLD_SIZE", env["LOCAL_WORLD_SIZE"]), "WORLD_SIZE")
    if per_node < 1 or world % per_node:
        raise ValueError(f"torchrun started WORLD_SIZE={world} processes, not a multiple of LOCAL_WORLD_SIZE={per_node} "
                         "per node: give every node the same --nproc-per-node")
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torch 2.x: restarted workers reuse the rendezvous store, where the old ranks' addresses are still
        # written; a restarted rank connects to a dead one and the group fails (tried: gloo "connection refused")
        raise ValueError(f"torchrun --max-restarts={env['TORCHELASTIC_MAX_RESTARTS']} needs a fresh store per restart: "
                         "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (README, "
                         "Scaling out), or a restarted group cannot reconnect")
    return per_node, world // per_node


def _leading_int(value: str, var: str) -> int:
    m = re.match(r"\s*(\d+)", value)
    if not m:
        raise ValueError(f"cannot read {var}={value!r} as a number")
    return int(m.group(1))


def slurm_layout(env: Mapping[str, str] = os.environ) -> Tuple[int, int]:
    """(tasks per node, nodes) of the allocation; one task per device.

    Lightning reads the task count per node from SLURM_NTASKS_PER_NODE, which only
    `--ntasks-per-node` sets: a bare `--ntasks=N` (N > 1) may spread tasks unevenly, so refuse it.
    """
    ntasks = _leading_int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    nnodes = _leading_int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1", "SLURM_NNODES")
    if "SLURM_NTASKS_PER_NODE" in env:
        per_node = _leading_int(env["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")
    elif ntasks == 1:
        per_node = 1
    else:
        raise ValueError(
            f"SLURM allocation has --ntasks={ntasks} but no --ntasks-per-node: Lightning needs the same number "
            f"of tasks (one per device) on every node. Submit with --ntasks-per-node=<devices per node>."
        )
    if per_node * nnodes != ntasks:
        raise ValueError(
            f"SLURM allocation has {ntasks} tasks on {nnodes} nodes, not {per_node} per node: "
            f"submit with --nodes=N --ntasks-per-node=<devices per node> (uniform layout)."
        )
    return per_node, nnodes


def _clean(name: str) -> str:
    # Job names become directory names: drop the script suffix, keep a portable character set.
    name = re.sub(r"\.(sh|bash|slurm|sbatch)$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"


def default_run_name(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """A run name that is the same for every rank and every requeue of one job; None if none applies.

    W&B agent run: `sweep-<sweep id>-<run id>` (a different sweep point never shares a directory,
    while a preempted run resumed by the sweep keeps its id). SLURM array task:
    `<job name>-<array job id>_<task id>`; other SLURM job: `<job name>-<job id>`.
    """
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return f"sweep-{_clean(env['WANDB_SWEEP_ID'])}-{_clean(env['WANDB_RUN_ID'])}"
    if in_torchrun(env) and env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # --rdzv-id: the same on every node
        return f"torchrun-{_clean(env['TORCHELASTIC_RUN_ID'])}"
    if not in_slurm_allocation(env) or not env.get("SLURM_JOB_ID"):
        return None
    name = _clean(env.get("SLURM_JOB_NAME") or "job")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{name}-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return f"{name}-{env['SLURM_JOB_ID']}"


def device_count(devices) -> Optional[int]:
    """How many devices (= processes per node) a `trainer.devices` value asks for; None for "all"."""
    if devices in DEFAULT_DEVICES:
        return None
    if isinstance(devices, str):
        if re.fullmatch(r"\d+", devices.strip()):
            return int(devices)
        return len([d for d in devices.split(",") if d.strip()])  # "0,1" is Lightning's GPU-id list
    if isinstance(devices, int):
        return devices
    return len(list(devices))  # a list of device ids


def trainer_devices(devices):
    """What Lightning gets for trainer.devices: null (the default, where no SLURM or torchrun filled it in) is one
    device; anything else as given ("auto": every device of the node)."""
    return 1 if devices is None else devices


def choose_devices(devices, available: int, env: Mapping[str, str] = os.environ) -> Tuple[int, str]:
    """(devices per node, why) for a trainer.devices value on a node with `available` devices of the run's
    accelerator: the allocation under SLURM or torchrun, one for null, all for "auto"/-1, else as given."""
    if in_slurm_allocation(env):
        return slurm_layout(env)[0], "SLURM allocation, --ntasks-per-node"
    if in_torchrun(env):
        return torchrun_layout(env)[0], "torchrun --nproc-per-node"
    if devices is None:
        return 1, f"default; trainer.devices=auto for all {available}" if available > 1 else "default"
    asked = device_count(devices)
    if asked is None:
        return available, f"trainer.devices={devices}: all of this node"
    return asked, f"trainer.devices={devices}"


def apply_cluster_env(cfg, env: Mapping[str, str] = os.environ, require_srun: bool = True):
    """Fill in `trainer.devices`, `trainer.num_nodes` and the run name from the launch; returns cfg.

    Modifies `cfg` in place (and returns it). Outside SLURM only the run name may change (W&B agent).
    `require_srun=False` is for previewing from the batch step, before `srun` starts the tasks.
    """
    name = default_run_name(env)
    if name and cfg.run.name == DEFAULT_RUN_NAME:
        name_run(cfg, name)
    if in_torchrun(env) and not in_slurm_allocation(env):
        return _apply_layout(cfg, *torchrun_layout(env), "torchrun", "--nproc-per-node", "--nnodes")
    if not in_slurm_allocation(env):
        return cfg
    per_node, nnodes = slurm_layout(env)
    _apply_layout(cfg, per_node, nnodes, "the SLURM allocation", "--ntasks-per-node", "--nodes", fill=False)
    if require_srun and per_node * nnodes > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        # In the batch step itself one process would wait forever for its peers.
        raise ValueError(
            f"this SLURM job has {per_node * nnodes} tasks but the process was not started by srun: launch it "
            f"as `srun python -m pipeline.train ...` (slurm/train.sh does), one process per task."
        )
    return _fill_layout(cfg, per_node, nnodes)


def _apply_layout(cfg, per_node: int, nnodes: int, launcher: str, per_node_flag: str, nodes_flag: str,
                  fill: bool = True):
    """Refuse trainer.devices / trainer.num_nodes that contradict the launcher's layout; fill them in."""
    asked = device_count(cfg.trainer.devices)
    if asked is not None and asked != per_node:
        raise ValueError(
            f"trainer.devices={cfg.trainer.devices} contradicts {launcher} of {per_node} process(es) per node (one "
            f"per device): drop trainer.devices (it is taken from {launcher}) or launch with {per_node_flag}={asked}.")
    if cfg.trainer.num_nodes not in (DEFAULT_NUM_NODES, nnodes):
        raise ValueError(
            f"trainer.num_nodes={cfg.trainer.num_nodes} contradicts {launcher} of {nnodes} node(s): drop "
            f"trainer.num_nodes (it is taken from {launcher}) or launch with {nodes_flag}={cfg.trainer.num_nodes}.")
    return _fill_layout(cfg, per_node, nnodes) if fill else cfg


def _fill_layout(cfg, per_node: int, nnodes: int):
    if device_count(cfg.trainer.devices) is None:  # keep an explicit, consistent list of device ids as given
        cfg.trainer.devices = per_node
    cfg.trainer.num_nodes = nnodes
    return cfg


def describe(cfg, env: Mapping[str, str] = os.environ) -> str:
    where = "SLURM allocation" if in_slurm_allocation(env) else "torchrun" if in_torchrun(env) else "local"
    devices = "null (one)" if cfg.trainer.devices is None else cfg.trainer.devices
    return (f"run.name={cfg.run.name} run.dir={cfg.run.dir} trainer.devices={devices} "
            f"trainer.num_nodes={cfg.trainer.num_nodes} ({where})")


def requeue_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """`scontrol requeue` this job (an array task as JOBID_TASKID), as Lightning's SLURM handler does; called
    by global rank zero after a USR1 stop, once the loggers have finished. True when SLURM accepted it."""
    import logging
    import subprocess

    log = logging.getLogger("pipeline.launch")
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
           else env.get("SLURM_JOB_ID", ""))
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeued: no SLURM job id in the environment")
        return False
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except OSError as e:
        log.warning("requeueing SLURM job %s failed: %s", job, e)
        return False
    if code:
        log.warning("requeueing SLURM job %s failed with exit code %d", job, code)
    else:
        log.warning("requeued SLURM job %s", job)
    return code == 0
