"""VAEModule under a real Lightning Trainer on CPU with tiny in-memory dict batches."""
import dataclasses
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import ConfigError, ModelConfig, load_config, to_object
from pipeline.training.module import VAEModule
from pipeline.vae import schedules as S
from pipeline.vae.metrics import ACTIVE_UNIT_THRESHOLD, ExactSums, active_units

SHAPE = (1, 8, 8)
MODEL = {"arch": "mlp", "latent_dim": 3, "hidden_dims": [32, 16]}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def examples(n, seed=0, shape=SHAPE):
    """n dict examples: uint8 images from 4 noisy templates, as a WebDataset loader would yield them."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(4, *shape, generator=g)
    out = []
    for i in range(n):
        img = (templates[i % 4] + 0.15 * torch.randn(shape, generator=g)).clamp(0, 1)
        out.append({"image": (img * 255).round().to(torch.uint8), "label": i % 4, "key": f"{i:06d}"})
    return out


def loader(n, batch_size, seed=0, shuffle=False):
    return DataLoader(examples(n, seed), batch_size=batch_size, shuffle=shuffle)


def trainer(**kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    log_every_n_steps=1)  # Record reads callback_metrics after every batch
    return pl.Trainer(**{**defaults, **kw})


class Record(pl.Callback):
    """Per training batch: the global step it ran at, its loss, and what it logged."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.rows.append((self._step, float(outputs["loss"]), logged))


# ---- training -------------------------------------------------------------------------------
def test_fit_runs_loss_falls_and_lr_follows_the_schedule():
    torch.manual_seed(0)
    optim = {"lr": 1e-2, "lr_schedule": "cosine", "lr_warmup_steps": 5, "min_lr_ratio": 0.1}
    module = VAEModule(MODEL, {"kl_schedule": "linear", "warmup_steps": 20}, optim, SHAPE, max_steps=60,
                       binarize="threshold")  # binary targets: the loss can fall towards 0
    rec = Record()
    trainer(max_steps=60, callbacks=[rec]).fit(module, loader(64, 16, shuffle=True))
    losses = [loss for _, loss, _ in rec.rows]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)  # measured 44 -> 29 nats (the KL warm-up adds back)
    logged = rec.rows[-1][2]
    assert {"train/loss", "train/elbo", "train/recon", "train/kl", "train/kl_weight",
            "train/bits_per_dim"} <= set(logged)
    assert "train/capacity_nats" not in logged
    assert logged["train/elbo"] == pytest.approx(-(logged["train/recon"] + logged["train/kl"]), rel=1e-5)
    assert logged["train/bits_per_dim"] == pytest.approx(-logged["train/elbo"] / (64 * math.log(2)), rel=1e-5)
    # the LambdaLR is stepped once per optimizer step
    lr = module.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-2 * S.lr_factor(60, module.optim_cfg, 60))


@pytest.mark.parametrize("schedule,accumulate", [("linear", 1), ("cyclical", 2), ("capacity", 1)])
def test_logged_kl_weight_equals_the_schedule_at_that_step(schedule, accumulate):
    torch.manual_seed(0)
    objective = {"kl_schedule": schedule, "beta": 2.0, "warmup_steps": 6, "cycles": 2,
                 "capacity_max_nats": 5.0, "capacity_steps": 6, "gamma": 3.0}
    module = VAEModule(MODEL, objective, {}, SHAPE, max_steps=10)
    rec = Record()
    trainer(max_steps=10, callbacks=[rec], accumulate_grad_batches=accumulate).fit(module, loader(80, 4))
    assert len(rec.rows) == 10 * accumulate
    steps = [step for step, _, _ in rec.rows]
    assert steps == [s for s in range(10) for _ in range(accumulate)]  # micro-batches share a step
    for step, _, logged in rec.rows:
        assert logged["train/kl_weight"] == pytest.approx(S.kl_weight(step, module.objective_cfg, 10))
        if schedule == "capacity":
            assert logged["train/capacity_nats"] == pytest.approx(S.capacity_nats(step, module.objective_cfg))
    varying = "train/capacity_nats" if schedule == "capacity" else "train/kl_weight"
    assert len({round(row[2][varying], 6) for row in rec.rows}) > 3  # the schedule actually moved


def test_non_finite_loss_raises_naming_the_step():
    module = VAEModule(MODEL, {}, {}, SHAPE, max_steps=10)
    with torch.no_grad():
        module.vae.to_mu_logvar.bias.fill_(float("nan"))
    batch = next(iter(loader(4, 4)))
    with pytest.raises(FloatingPointError, match="global_step 0"):
        module.training_step(batch, 0)


def test_losses_held_between_checks_are_stacked_in_blocks_and_the_first_non_finite_is_named():
    """Losses noted over many steps with no check (logging off, no validation or checkpoint for a while) are
    stacked every LOSS_BLOCK steps, without a host read; the check still names the first non-finite step and
    its loss, and a check that finds none lets the losses go."""
    module = VAEModule(MODEL, {}, {}, SHAPE, max_steps=10)
    steps = iter(range(10**6))
    type(module).global_step = property(lambda self: next(steps))  # a counter instead of a Trainer
    try:
        n = 2 * module.LOSS_BLOCK + 7
        for i in range(n):
            module._note_non_finite(torch.tensor(float("inf") if i in (300, 400) else 1.0))
        held = module._losses
        assert len(held["blocks"]) == 2 and len(held["recent"]) == 7 and len(held["steps"]) == n
        with pytest.raises(FloatingPointError, match=r"^non-finite training loss \(inf\) at global_step 300$"):
            module._raise_if_non_finite()
        for _ in range(5):
            module._note_non_finite(torch.tensor(2.0))
        module._raise_if_non_finite()  # all finite: no error, nothing held
        assert held["blocks"] == [] and held["recent"] == [] and held["steps"] == []
    finally:
        del type(module).global_step


def test_non_finite_loss_between_checks_stops_before_the_next_checkpoint_naming_its_step(tmp_path):
    """No host read per step: a non-finite loss is noted on the device and read where the host reads anyway
    (written metrics) or must know (before a validation or a checkpoint). The error still names the step it
    happened at, and no checkpoint holds weights trained after it: the last good one stays."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.vae.to_mu_logvar.bias.fill_(float("nan"))

    module = VAEModule(MODEL, {}, {}, SHAPE, max_steps=20)
    every_2 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    with pytest.raises(FloatingPointError, match=r"^non-finite training loss \(nan\) at global_step 3$"):
        trainer(max_steps=20, log_every_n_steps=50, enable_checkpointing=True,
                callbacks=[Poison(), every_2]).fit(module, loader(64, 4))
    assert module.trainer.global_step == 4  # it trained on after step 3 (no check there) ...
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["step=2.ckpt"]  # ... and the step-4 save stopped it
    saved = torch.load(tmp_path / "step=2.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_binarize_modes():
    batch = next(iter(loader(8, 8)))
    image = batch["image"]
    x = VAEModule(MODEL, {}, {}, SHAPE, 10).to_float(image)
    torch.testing.assert_close(x, image.float() / 255)
    t = VAEModule(MODEL, {}, {}, SHAPE, 10, binarize="threshold").to_float(image)
    torch.testing.assert_close(t, (image.float() / 255 > 0.5).float())
    dyn = VAEModule(MODEL, {}, {}, SHAPE, 10, binarize="dynamic")
    torch.manual_seed(0)
    a, b = dyn.to_float(image), dyn.to_float(image)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)  # fresh draws each time
    big = image.repeat(500, 1, 1, 1)  # E[bernoulli(x)] = x
    torch.testing.assert_close(dyn.to_float(big).mean(0), x.mean(0), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="stochastic"):
        VAEModule(MODEL, {}, {}, SHAPE, 10, binarize="stochastic")


def test_bad_sections_fail_at_construction_naming_the_key():
    with pytest.raises(ConfigError, match="objective.kl_schedule"):
        VAEModule(MODEL, {"kl_schedule": "cylical"}, {}, SHAPE, 10)
    with pytest.raises(ConfigError, match="latent_dimm"):
        VAEModule({**MODEL, "latent_dimm": 3}, {}, {}, SHAPE, 10)
    with pytest.raises(ConfigError, match="optim.lr_schedule"):
        VAEModule(MODEL, {}, {"lr_schedule": "step"}, SHAPE, 10)


# ---- exact validation averages --------------------------------------------------------------
def _module_with_known_active_units(**objective):
    """latent_dim 3; mu_0 is constant (inactive), mu_1 and mu_2 vary strongly (active)."""
    torch.manual_seed(0)
    module = VAEModule(MODEL, objective, {}, SHAPE, max_steps=10)
    with torch.no_grad():
        module.vae.to_mu_logvar.weight[0].zero_()
        module.vae.to_mu_logvar.weight[1:3].mul_(20.0)
    return module


def test_validation_metrics_are_exact_averages_over_uneven_batches():
    module = _module_with_known_active_units(beta=2.0, free_bits=0.3, val_iwae_samples=4)
    seen, iwaes = [], []
    terms_fn, iwae_fn = module._terms, module.iwae

    def record_terms(x):
        t = terms_fn(x)
        seen.append({k: v.detach().double() for k, v in t.items()})
        return t

    def record_iwae(x, k, chunk_size=None):
        v = iwae_fn(x, k, chunk_size)
        iwaes.append(v.double())
        return v
    module._terms, module.iwae = record_terms, record_iwae
    out = trainer().validate(module, loader(13, 10), verbose=False)[0]  # batches of 10 and 3
    assert [len(t["elbo"]) for t in seen] == [10, 3]
    all_ = {k: torch.cat([t[k] for t in seen]) for k in seen[0]}
    mean = {k: v.mean(0) for k, v in all_.items()}
    active = int((all_["mu"].var(0, unbiased=False) > ACTIVE_UNIT_THRESHOLD).sum())
    assert active == 2  # the setup does what it says
    kl_term = mean["kl_per_dim"].clamp(min=0.3).sum().item()  # free bits on the all-example mean
    expected = {
        "val/elbo": mean["elbo"].item(),
        "val/recon": mean["recon"].item(),
        "val/kl": mean["kl"].item(),
        "val/bits_per_dim": -mean["elbo"].item() / (64 * math.log(2)),
        "val/loss": mean["recon"].item() + 2.0 * kl_term,
        "val/active_units": float(active),
        "val/iwae": torch.cat(iwaes).mean().item(),
        **{f"val/kl_dim_{d}": mean["kl_per_dim"][d].item() for d in range(3)},
    }
    assert set(expected) <= set(out)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    # and the test can tell: the mean of the two batch means is measurably different
    batch_means = (seen[0]["elbo"].mean() + seen[1]["elbo"].mean()).item() / 2
    assert abs(batch_means - expected["val/elbo"]) > 1e-3
    assert out["val/iwae"] > out["val/elbo"] - 1.0  # k=4 bound, not below the ELBO by much


def test_exact_sums_means_variance_and_kept_codes():
    """ExactSums.means() (what validation logs and pipeline.evaluate reports): exact means, the
    population variance of the mean codes, and, with keep_codes, the codes of the batches with factors."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 3, generator=g) * torch.tensor([1.0, 0.05, 0.2])
    kl_dim = torch.rand(7, 3, generator=g)
    iwae = torch.randn(7, generator=g)
    factors = torch.randint(0, 3, (4, 2)).float()
    metric = ExactSums(3, keep_codes=True)
    assert metric.means() is None  # nothing seen yet
    for lo, hi, f in ((0, 4, factors), (4, 7, None)):
        terms = {"mu": mu[lo:hi], "kl_per_dim": kl_dim[lo:hi], "kl": kl_dim[lo:hi].sum(1),
                 "recon": -iwae[lo:hi], "elbo": iwae[lo:hi] - 1}
        metric.update(terms, iwae[lo:hi], f)
    m = metric.means()
    assert m["count"] == 7
    assert m["iwae"].item() == pytest.approx(iwae.double().mean().item(), abs=1e-12)
    assert torch.allclose(m["kl_dim"], kl_dim.double().mean(0))
    assert torch.allclose(m["mu_variance"], mu.double().var(0, unbiased=False))
    assert active_units(m["mu_variance"]) == int((mu.var(0, unbiased=False) > ACTIVE_UNIT_THRESHOLD).sum()) == 2
    assert torch.equal(m["codes"], mu[:4]) and torch.equal(m["factors"], factors)  # the batch with factors only
    plain = ExactSums(3)  # validation's: no codes kept, even when batches carry factors
    plain.update(terms, iwae[4:], torch.zeros(3, 2))
    assert "codes" not in plain.means() and "factors" not in plain.means()


def test_test_stage_logs_the_same_keys_and_resets_between_epochs():
    module = _module_with_known_active_units()
    t = trainer()
    first = t.test(module, loader(13, 10), verbose=False)[0]
    again = t.test(module, loader(13, 10), verbose=False)[0]
    assert {"test/loss", "test/elbo", "test/recon", "test/kl", "test/bits_per_dim",
            "test/active_units", "test/kl_dim_0", "test/kl_dim_2"} <= set(first)
    assert "test/iwae" not in first  # val_iwae_samples = 0
    # KL is deterministic given x: identical if the sums were reset (doubled counts would not be)
    assert again["test/kl"] == pytest.approx(first["test/kl"], rel=1e-6)
    assert again["test/active_units"] == first["test/active_units"] == 2.0


# ---- checkpoints ----------------------------------------------------------------------------
def test_checkpoint_loads_back_and_resumes(tmp_path):
    cfg = load_config([], ["model.latent_dim=3", "model.hidden_dims=[32,16]", "objective.kl_schedule=cyclical",
                           "optim.lr_schedule=cosine", "optim.lr_warmup_steps=2"])
    torch.manual_seed(0)
    module = VAEModule(cfg.model, cfg.objective, cfg.optim, SHAPE, max_steps=6, binarize="threshold")
    t = trainer(max_steps=3, default_root_dir=tmp_path)
    t.fit(module, loader(32, 8))
    path = tmp_path / "step3.ckpt"
    t.save_checkpoint(path)

    raw = torch.load(path, weights_only=True)  # fails on any omegaconf (or other non-plain) object
    hp = raw["hyper_parameters"]
    assert type(hp["model"]) is dict and hp["model"]["latent_dim"] == 3 and hp["input_shape"] == [1, 8, 8]
    assert raw["lr_schedulers"][0]["last_epoch"] == 3

    loaded = VAEModule.load_from_checkpoint(path)
    assert loaded.hparams == module.hparams and loaded.binarize == "threshold"
    for (k, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    module.eval(), loaded.eval()
    batch = next(iter(loader(8, 8, seed=1)))
    outs = []
    for m in (module, loaded):
        torch.manual_seed(7)
        outs.append(m.elbo_batch(batch))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    x = loaded.to_float(batch["image"])
    assert torch.equal(module.reconstruct(x), loaded.reconstruct(x))

    # the sections are kept as their dataclasses; the hyperparameters saved are their asdict
    assert isinstance(loaded.model_cfg, ModelConfig) and hp["model"] == dataclasses.asdict(loaded.model_cfg)
    assert hp["objective"] == dataclasses.asdict(to_object(cfg.objective))

    # a checkpoint of an older version (hyperparameters as partial dicts, keys since added left out) loads
    # through the loader evaluation shares, with the schema's defaults filled in
    old = dict(raw, hyper_parameters={**hp, "model": {k: v for k, v in hp["model"].items() if k != "logvar_max"}})
    torch.save(old, tmp_path / "old.ckpt")
    again, state = VAEModule.from_checkpoint(tmp_path / "old.ckpt")
    assert again.model_cfg == loaded.model_cfg and state["global_step"] == 3
    for (k, a), (_, b) in zip(module.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k

    # resuming restores the step, and with it the KL and LR schedules
    rec = Record()
    t2 = trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[rec])
    t2.fit(loaded, loader(32, 8), ckpt_path=path)
    assert [s for s, _, _ in rec.rows] == [3, 4, 5]
    assert rec.rows[0][2]["train/kl_weight"] == pytest.approx(S.kl_weight(3, loaded.objective_cfg, 6))
    lr = t2.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(cfg.optim.lr * S.lr_factor(6, loaded.optim_cfg, 6))


# ---- helpers for callbacks / evaluation -----------------------------------------------------
def test_helpers_shapes_and_traversal_content():
    module = _module_with_known_active_units()
    batch = next(iter(loader(5, 5)))
    x = module.to_float(batch["image"])
    rec = module.reconstruct(x)
    assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1
    assert module.sample(7).shape == (7, *SHAPE)
    values = [-2.0, 0.0, 2.0]
    grid = module.traverse(x[0], dims=[1, 2], values=values)
    assert grid.shape == (6, *SHAPE)
    mu, _ = module.vae.encode(x[:1])
    z = mu.repeat(1, 1)
    z[0, 2] = 2.0  # row for dim 2, last value
    expected = torch.sigmoid(module.vae.decode(z))[0]
    torch.testing.assert_close(grid[5], expected)
    terms = module.elbo_batch(batch)
    assert {k: tuple(v.shape) for k, v in terms.items()} == {
        "recon": (5,), "kl": (5,), "elbo": (5,), "kl_per_dim": (5, 3), "mu": (5, 3)}
    torch.manual_seed(0)
    bound = module.iwae(x, k=50, chunk_size=7)
    assert bound.shape == (5,) and torch.isfinite(bound).all()
    assert bound.mean() > terms["elbo"].mean() - 1.0


# ---- DDP: exact sums across ranks with different numbers of validation batches --------------
class RankSplit(pl.LightningDataModule):
    """Rank 0 validates 13 examples (batches 10 + 3), rank 1 validates 5 (one batch)."""

    def val_dataloader(self):
        data = examples(18, seed=3)
        mine = data[:13] if self.trainer.global_rank == 0 else data[13:]
        return DataLoader(mine, batch_size=10)


@pytest.mark.slow
def test_ddp_validation_is_exact_over_all_ranks():
    module = _module_with_known_active_units()
    t = trainer(devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    out = t.validate(module, datamodule=RankSplit(), verbose=False)[0]
    # KL and mu do not depend on the sampled z: compare with one process over all 18 examples
    batch = next(iter(DataLoader(examples(18, seed=3), batch_size=18)))
    terms = module.elbo_batch(batch)
    assert out["val/kl"] == pytest.approx(terms["kl"].double().mean().item(), rel=1e-6)
    for d in range(3):
        assert out[f"val/kl_dim_{d}"] == pytest.approx(terms["kl_per_dim"][:, d].double().mean().item(), rel=1e-6)
    var = terms["mu"].double().var(0, unbiased=False)
    assert out["val/active_units"] == float((var > ACTIVE_UNIT_THRESHOLD).sum()) == 2.0
    # a mean of the two rank means would weight rank 1's 5 examples like rank 0's 13
    rank_means = (terms["kl"][:13].mean() + terms["kl"][13:].mean()).item() / 2
    assert abs(rank_means - out["val/kl"]) > 1e-3
