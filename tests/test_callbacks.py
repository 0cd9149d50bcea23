"""Callbacks without a Trainer: image grids large enough to see."""
import torch

from pipeline.vae.grids import image_grid


def test_small_images_are_upscaled_nearest_neighbour_to_at_least_64_px():
    digits = torch.rand(16, 1, 8, 8)  # the default dataset: 8x8
    grid = image_grid(digits, nrow=8, pad=1)
    # 8x upscaled: 2 rows x 8 columns of 64 px cells and 1 px padding
    assert grid.shape == (2 * 65 + 1, 8 * 65 + 1, 3)
    cell = grid[1:65, 1:65, 0]
    assert (cell == cell[::8, ::8].repeat(8, 0).repeat(8, 1)).all()  # nearest: 8x8 blocks of one value
    expected = (digits[0, 0] * 255).round().to(torch.uint8).numpy()
    assert (cell[::8, ::8] == expected).all()

    mnist = image_grid(torch.rand(4, 1, 28, 28), nrow=4)  # 28 px -> 3x = 84 px
    assert mnist.shape == (85 + 1, 4 * 85 + 1, 3)
    wide = image_grid(torch.rand(2, 3, 16, 40), nrow=2)  # the short side sets the factor: 16 -> 64
    assert wide.shape == (64 + 2, 2 * (160 + 1) + 1, 3)


def test_large_images_keep_their_size():
    grid = image_grid(torch.rand(3, 3, 64, 64), nrow=3)
    assert grid.shape == (66, 3 * 65 + 1, 3)


def test_step_seeding_seeds_the_current_cuda_device_only(monkeypatch):
    """On a GPU run each step reseeds the rank's own device, not every device of the node (checked on CPU with
    CUDA reported initialised and its seeding functions recorded)."""
    from pipeline.training import callbacks

    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("current", s)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("all", s)))
    callbacks._seed_torch(42)
    assert calls == [("current", 42)] and torch.initial_seed() == 42


def test_usr1_and_term_are_deferred_while_the_training_data_loads(tmp_path):
    """From Lightning's signal registration on (before the training data loads: a long data.cache fill, DDP's
    first collectives) USR1 and TERM reach DeferredSignals, which records them for the next batch end; before,
    Lightning's handlers were live until on_train_start."""
    import signal

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from pipeline.training.callbacks import DeferredSignals
    from pipeline.training.module import VAEModule

    seen = {}

    class Recording(pl.LightningDataModule):
        def train_dataloader(self):
            seen["term"], seen["usr1"] = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
            return DataLoader([{"image": torch.zeros(1, 4, 4, dtype=torch.uint8)}] * 4, batch_size=2)

    deferred = DeferredSignals(tmp_path / "last.ckpt")
    before = signal.getsignal(signal.SIGTERM)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[deferred])
    trainer.fit(VAEModule({"hidden_dims": [8], "latent_dim": 2}, {}, {}, (1, 4, 4), max_steps=1), datamodule=Recording())
    assert seen["term"] == deferred._on_signal and seen["usr1"] == deferred._on_signal
    assert signal.getsignal(signal.SIGTERM) == before  # given back after fit
