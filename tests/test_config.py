"""Config: YAML + overrides merge in order; bad keys, types and values name the key."""
import pytest

from pipeline.config import ConfigError, from_dict, identity_differences, load_config, to_dict
from pipeline.launch.cli import split_argv
from pipeline.training.train import main
from tests.helpers.run import REPO


def test_defaults_then_files_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("objective:\n  beta: 2.0\nmodel:\n  latent_dim: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("objective:\n  beta: 3.0\n")
    cfg = load_config([a, b], ["model.latent_dim=7"])
    assert cfg.objective.beta == 3.0  # later file wins
    assert cfg.model.latent_dim == 7  # command line wins
    assert cfg.run.dir == "runs/default"
    assert cfg.data.seed == cfg.seed
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, expected", [
    ("objective.betta=3", ["'objective.betta'", "objective.beta"]),   # typo: names nearest valid key
    ("model.latnt_dim=3", ["'model.latnt_dim'", "model.latent_dim"]),
    ("objective.beta=abc", ["'objective.beta'"]),                      # wrong type
    ("trainer.max_steps=1.5", ["'trainer.max_steps'"]),
    ("model.arch=transformer", ["'model.arch'", "mlp, conv"]),          # bad enum value
    ("objective.kl_schedule=warmup", ["'objective.kl_schedule'", "cyclical"]),
    ("data.batch_size=0", ["'data.batch_size'", "> 0"]),
    ("objective.cycle_ratio=1.5", ["'objective.cycle_ratio'"]),
    ("resume=/no/such.ckpt", ["'resume'"]),
    ("optim.lr=inf", ["'optim.lr'", "finite"]),                        # passes `> 0`, fails at step 1
    ("objective.beta=inf", ["'objective.beta'", "finite"]),
    ("optim.betas=[0.9,inf]", ["'optim.betas'", "finite"]),
    ("model.hidden_dims=[64,0]", ["'model.hidden_dims'", "> 0"]),     # not a PyTorch shape error
    ("model.conv_channels=[32,-1]", ["'model.conv_channels'", "> 0"]),
    ("optim.betas=[0.9,1.5]", ["'optim.betas'", "[0, 1)"]),
    ("trainer.max_loss=-1", ["'trainer.max_loss'", "> 0"]),
    ("trainer.limit_val_batches=-1", ["'trainer.limit_val_batches'"]),
])
def test_bad_config_names_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    for text in expected:
        assert text in str(e.value)


def test_bad_yaml_file_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  archh: conv\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'model\.archh'.*model\.arch"):
        load_config([bad])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])


def test_every_shipped_config_loads():
    files = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "sweep.yaml")
    assert len(files) >= 5
    for f in files:
        load_config([f])
        assert f.read_text().startswith("#"), f"{f.name} must open with its purpose"


def test_cli_reports_config_errors(capsys):
    assert main(["objective.betta=2"]) == 2
    assert "objective.beta" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        split_argv(["notakeyvalue"])


def flat_defaults(node: dict, prefix: str = "") -> dict:
    """Every leaf key of a nested dict with its value."""
    out = {}
    for k, v in node.items():
        out.update(flat_defaults(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def yaml_text(value) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return str(value)


def test_help_lists_every_config_key_with_type_default_and_meaning(capsys):
    from omegaconf import OmegaConf

    from pipeline.config import Config

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # the schema's leaves and defaults straight from OmegaConf, not from the help code
    defaults = flat_defaults(OmegaConf.to_container(OmegaConf.structured(Config)))
    assert len(defaults) > 60 and "logger.wandb.mode" in defaults
    for key, default in defaults.items():
        line = next((ln for ln in lines if ln.startswith(f"  {key} = ")), None)
        assert line is not None, f"{key} missing from --help"
        assert line.startswith(f"  {key} = {yaml_text(default)} "), line
        meaning = line.split(":", 1)[1].strip() if ":" in line else ""
        assert meaning, f"{key} has no one-line meaning (its help in pipeline/config.py): {line}"
    assert "kl_schedule = constant" in out and "constant|linear|sigmoid|cosine|cyclical|capacity" in out
    # each field's bounds, the ones validate checks, beside its type
    assert "  data.batch_size = 128 " in out and "int, > 0: per device" in out
    assert "float, in (0, 1]: cyclical: fraction of each cycle" in out and "list[int], each > 0: mlp layer widths" in out
    assert "python -m pipeline.train configs/dsprites_beta.yaml objective.beta=8" in out  # examples


def test_resume_identity_lists_what_changes_the_training_and_allows_the_rest():
    saved = load_config([], ["trainer.max_steps=100"])
    same_run = load_config([], [
        "trainer.max_steps=200", "trainer.devices=2", "trainer.num_nodes=2", "data.num_workers=8",
        "checkpoint.every_n_steps=7", "trainer.val_check_interval=9", "trainer.log_every_n_steps=3",
        "logger.wandb.mode=offline", "logger.wandb.tags=[a]", "logger.images_every_n_steps=0",
        "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "run.name=other", "resume=never",
        "trainer.max_loss=1e4"])
    assert identity_differences(saved, same_run) == []
    changed = load_config([], ["trainer.max_steps=200", "optim.lr=0.01", "model.hidden_dims=[8]", "seed=1"])
    assert identity_differences(saved, changed) == [
        ("data.seed", 0, 1), ("model.hidden_dims", [256, 128], [8]), ("optim.lr", 0.001, 0.01), ("seed", 0, 1)]
    # A schedule stretched over max_steps makes max_steps part of what is trained.
    cosine = load_config([], ["optim.lr_schedule=cosine", "trainer.max_steps=100"])
    longer = load_config([], ["optim.lr_schedule=cosine", "trainer.max_steps=200"])
    assert identity_differences(cosine, longer) == [("trainer.max_steps", 100, 200)]


@pytest.mark.parametrize("value", ["-1", "'-1'"])
def test_minus_one_devices_means_all_like_lightning(value):
    # Lightning's "all devices"; on the CPU accelerator it raised inside Lightning, "auto" is the same request
    assert load_config([], [f"trainer.devices={value}"]).trainer.devices == "auto"
