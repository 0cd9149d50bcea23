"""No W&B key reaches config.yaml, the console, W&B or a checkpoint: a value from the environment
(`${oc.env:...}`) or equal to the key (WANDB_API_KEY, the netrc password) is refused at start naming the key
(exit 2), and a run made with a (fake) key in its environment writes it nowhere: every file it writes is grepped."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, refuse_secret_values
from tests.helpers.run import read_metrics, run_train
from tests.helpers.wandb_records import check_history

FAKE_KEY = "fake0123456789abcdef0123456789abcdef0123"  # 40 characters, as a W&B key


def offline(tiny_overrides) -> list:
    return [a for a in tiny_overrides if not a.startswith("logger.wandb.mode=")] + ["logger.wandb.mode=offline"]


def assert_refused(proc, key: str) -> None:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), proc.stderr
    assert FAKE_KEY not in proc.stdout + proc.stderr


def test_environment_values_are_refused_naming_the_key(monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    with pytest.raises(ConfigError, match=r"^data.root: values from the environment"):
        load_config([], ["data.root=${oc.env:SCRATCH}/digits"])
    assert load_config([], ["data.root=/scratch/me/digits"]).data.root == "/scratch/me/digits"  # the way out


def test_values_holding_the_key_are_refused():
    cfg = load_config([], ["run.name=x", f"logger.wandb.group=team-{FAKE_KEY}"])
    with pytest.raises(ConfigError, match=r"^logger.wandb.group holds your W&B API key"):
        refuse_secret_values(cfg, [FAKE_KEY])
    refuse_secret_values(cfg, ["short"])  # too short to be a key: not looked for


@pytest.mark.slow
def test_key_through_config_file_override_or_netrc_stops_the_run(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    shared = tmp_path / "shared.yaml"
    shared.write_text('logger:\n  wandb:\n    tags: ["${oc.env:WANDB_API_KEY}"]\n')
    env = {"WANDB_API_KEY": FAKE_KEY}
    assert_refused(run_train([str(shared), *offline(tiny_overrides)], env, check=False), "logger.wandb.tags.0")
    assert_refused(run_train([*offline(tiny_overrides), f"logger.wandb.tags=[{FAKE_KEY}]"], env, check=False),
                   "logger.wandb.tags.0")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert_refused(run_train([*offline(tiny_overrides), f"run.name={FAKE_KEY}"], {"NETRC": str(netrc)},
                             check=False), "run.name")
    assert not run_dir.exists()  # refused before anything was written


@pytest.mark.slow
def test_a_resumed_offline_run_keeps_one_wandb_history_and_writes_the_key_nowhere(tiny_overrides, tmp_path):
    """Offline W&B, a checkpoint, a resume: grep config.yaml, metrics.csv, checkpoints, images, wandb/ (the
    .wandb records, debug logs: what `wandb sync` uploads), and the console. The same two runs (20 steps, then
    the finished run extended to 40) show that a resumed run keeps its W&B run and continues one W&B history
    (were tests/test_train.py::test_resumed_run_keeps_its_wandb_run and
    tests/test_wandb_history.py::test_extended_run_continues_one_history, which trained such runs again)."""
    run_dir = tmp_path / "run"
    args = offline(tiny_overrides) + ["trainer.max_steps=20"]
    out = [run_train(args, {"WANDB_API_KEY": FAKE_KEY})]
    first_id = (run_dir / "wandb_run_id.txt").read_text().split()[0]
    out.append(run_train(args[:-1] + ["trainer.max_steps=40"], {"WANDB_API_KEY": FAKE_KEY}))
    for proc in out:
        assert FAKE_KEY not in proc.stdout + proc.stderr

    assert "resuming from" in out[1].stdout and "(step 20)" in out[1].stdout
    assert (run_dir / "wandb_run_id.txt").read_text().split()[0] == first_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)  # one W&B run, two parts
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss")]
    # every 5th step once: none lost, none twice, each under its own step (the last, 39, is the 40th step)
    assert steps == list(range(4, 40, 5))
    segs = check_history(run_dir, n_segments=2)  # W&B's own records: one history across both parts
    assert not any(s["artifacts"] for s in segs)  # logger.wandb.log_checkpoints is off by default

    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files), files
    leaked = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert Path(tmp_path / "run" / "config.yaml").is_file()
