"""pipeline.launch.sweep without SLURM: grid expansion, and argv identical to what wandb's agent builds."""
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.launch.sweep import SweepError, agent_command, grid_points, load_sweep, main, point, train_args

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILE = REPO / "configs" / "sweep.yaml"
BETAS = [0.5, 1, 2, 4, 8, 16]


def wandb_agent_command(sweep: dict, params: dict, tmp_path, monkeypatch) -> list:
    """The command wandb's own Agent builds for a run with these params (process start captured)."""
    from wandb import wandb_agent

    captured = {}

    class Captured:
        def __init__(self, command=None, env=None, **kw):
            captured["command"], captured["env"] = command, env

    monkeypatch.setattr(wandb_agent, "AgentProcess", Captured)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the agent writes the run's config file there
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "placeholder")  # the agent sets it; monkeypatch restores it
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "placeholder")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw1")
    agent._sweep_command = sweep["command"]
    agent._command_run({"type": "run", "run_id": "run1", "program": sweep.get("program"),
                        "args": {k: {"value": v} for k, v in params.items()}})
    assert captured["env"]["WANDB_RUN_ID"] == "run1"
    return captured["command"]


def test_sweep_file_is_a_valid_beta_grid():
    sweep = load_sweep(SWEEP_FILE)
    assert sweep["method"] == "grid" and sweep["name"]
    assert [p["objective.beta"] for p in grid_points(sweep)] == BETAS
    # every swept key is a real config key with a valid value
    for p in grid_points(sweep):
        assert load_config([], train_args(sweep, p)).objective.beta == float(p["objective.beta"])


def test_sweep_file_loads_with_wandb():
    from wandb.sdk.launch.sweeps.utils import load_sweep_config

    assert load_sweep_config(str(SWEEP_FILE))["parameters"]["objective.beta"]["values"] == BETAS


@pytest.mark.parametrize("index", range(len(BETAS)))
def test_argv_equals_wandb_agents(index, tmp_path, monkeypatch):
    sweep = load_sweep(SWEEP_FILE)
    params = point(sweep, index)
    ours = agent_command(sweep, params)
    assert ours == wandb_agent_command(sweep, params, tmp_path, monkeypatch)
    assert ours[-1] == f"objective.beta={BETAS[index]}"


def test_grid_is_cartesian_in_file_order(tmp_path, monkeypatch):
    f = tmp_path / "s.yaml"
    f.write_text(
        "method: grid\n"
        "parameters:\n"
        "  objective.beta: {values: [1, 4]}\n"
        "  model.latent_dim: {value: 6}\n"
        "  optim.lr: {values: [0.001, 0.0003]}\n"
        "  model.hidden_dims: {values: [[64, 32]]}\n"
        "command: ['${env}', '${interpreter}', '-m', 'pipeline.train', configs/x.yaml, '${args_no_hyphens}']\n"
    )
    sweep = load_sweep(f)
    pts = grid_points(sweep)
    assert [(p["objective.beta"], p["optim.lr"]) for p in pts] == [(1, 0.001), (1, 0.0003), (4, 0.001), (4, 0.0003)]
    assert all(p["model.latent_dim"] == 6 for p in pts)
    assert grid_points(sweep) == pts  # deterministic
    args = train_args(sweep, pts[1])
    assert args == ["configs/x.yaml", "objective.beta=1", "model.latent_dim=6", "optim.lr=0.0003",
                    "model.hidden_dims=[64, 32]"]
    assert agent_command(sweep, pts[1]) == wandb_agent_command(sweep, pts[1], tmp_path, monkeypatch)
    assert list(load_config([], args[1:]).model.hidden_dims) == [64, 32]


@pytest.mark.parametrize("text, match", [
    ("method: random\nparameters: {a: {values: [1]}}\n", "grid"),
    ("method: grid\n", "parameters"),
    ("method: grid\nparameters: {a: {min: 0, max: 1}}\n", "values"),
    ("method: grid\nparameters: {a: {values: []}}\n", "values"),
])
def test_bad_sweep_files_are_refused(tmp_path, text, match):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(SweepError, match=match):
        load_sweep(f)


def test_command_must_run_the_training_module():
    sweep = {"method": "grid", "parameters": {"a": {"values": [1]}},
             "command": ["${env}", "${interpreter}", "${program}", "${args}"]}
    with pytest.raises(SweepError, match="not supported"):
        train_args(sweep, {"a": 1})
    with pytest.raises(SweepError, match="pipeline.train"):
        train_args({**sweep, "command": ["${env}", "${interpreter}", "other.py", "${args_no_hyphens}"]}, {"a": 1})


def test_cli(capsys):
    assert main([str(SWEEP_FILE), "--count"]) == 0
    assert capsys.readouterr().out.split() == [str(len(BETAS))]
    assert main([str(SWEEP_FILE), "--index", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == ["objective.beta=4"]
    assert main([str(SWEEP_FILE), "--command", "0"]) == 0
    assert capsys.readouterr().out.strip() == "/usr/bin/env python -m pipeline.train objective.beta=0.5"
    assert main([str(SWEEP_FILE), "--name"]) == 0
    assert capsys.readouterr().out.strip() == "beta-sweep"
    assert main([str(SWEEP_FILE), "--index", "6"]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_local_sweep_trains_each_point_resumes_skips_finished_and_reports(tiny_overrides, tmp_path, capfd):
    import torch

    from pipeline.launch.sweep import point_args
    from pipeline.training.train import train

    f = tmp_path / "s.yaml"
    f.write_text("name: tiny-sweep\nmethod: grid\n"
                 "parameters:\n  objective.beta: {values: [0.5, 4]}\n  optim.lr: {value: 0.002}\n"
                 "command: ['${env}', '${interpreter}', '-m', 'pipeline.train', '${args_no_hyphens}']\n")
    out = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides if not o.startswith("run.dir=")] + ["trainer.max_steps=20"]
    sweep = load_sweep(f)
    dirs = [out / "objective.beta=0.5", out / "objective.beta=4"]
    # point 2 was interrupted at step 10 by an earlier invocation: the sweep resumes it
    args = point_args(sweep, point(sweep, 1), dirs[1].name, dirs[1], "tiny-sweep", overrides)
    train(load_config([], args + ["trainer.max_steps=10"]))

    assert main(["run", str(f), "--out", str(out), *overrides]) == 0
    text = capfd.readouterr().out
    assert "# sweep tiny-sweep: point 1/2 objective.beta=0.5 -> " in text
    assert f"resuming from {dirs[1] / 'checkpoints' / 'last.ckpt'} (step 10)" in text
    for d, beta in zip(dirs, [0.5, 4.0]):
        cfg = load_config([d / "config.yaml"])
        assert (cfg.objective.beta, cfg.optim.lr, cfg.logger.wandb.group) == (beta, 0.002, "tiny-sweep")
        assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 20
    table = text[text.index("| run | beta |"):]
    assert "| objective.beta=0.5 | 0.50 |" in table and "| objective.beta=4 | 4.00 |" in table
    assert (out / "report" / "report.md").is_file()

    # the same command again: every point finished, nothing trains, the table again
    assert main(["run", str(f), "--out", str(out), *overrides]) == 0
    text = capfd.readouterr().out
    assert "point 1/2 objective.beta=0.5: finished (step 20), skipped" in text
    assert "point 2/2 objective.beta=4: finished (step 20), skipped" in text
    assert "# run " not in text and "| objective.beta=4 | 4.00 |" in text


def test_sweep_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m pipeline.sweep run configs/sweep.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "examples:" in capsys.readouterr().out
