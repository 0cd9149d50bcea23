"""The LightningModule: one shared step keyed by stage, exact validation averages, optimizers.

    module = VAEModule(to_object(cfg.model), to_object(cfg.objective), to_object(cfg.optim),  # config.to_object
                       input_shape=(1, 28, 28), max_steps=cfg.trainer.max_steps, binarize=cfg.data.binarize)
    module, checkpoint = VAEModule.from_checkpoint("runs/x/last.ckpt")   # hparams: the sections' asdict

Batches are dicts: `image` uint8 [B, C, H, W] (always), maybe `label` [B], `factors` [B, F], `key`.
Images become float in [0, 1] here, on the device, not in the loader.

Logged (all in nats per example unless named otherwise):
  train/{loss, elbo, recon, kl, kl_weight, bits_per_dim[, capacity_nats]}   every step, no syncs
  train/grad_norm (total, before clipping) with optim.grad_clip_norm or grad_skip_norm; train/skipped_steps (a
      running count) with grad_skip_norm: on the steps whose metrics are written, no host read on others
A non-finite training loss stops the run (FloatingPointError naming its step) without a host read per step:
see `_note_non_finite`.
  {val,test}/{loss, elbo, recon, kl, bits_per_dim, active_units, kl_dim_<d>[, iwae]}
      at epoch end, exact averages over all examples of all ranks (summed states, one sync)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from torch import nn

from pipeline.config import Binarize, ModelConfig, ObjectiveConfig, OptimConfig, choices, section
from pipeline.training import accel
from pipeline.training.lightning_compat import attached_trainer, logs_written_this_step
from pipeline.vae import objectives, schedules
from pipeline.vae.metrics import ExactSums, active_units
from pipeline.vae.model import VAE

STAGES = ("val", "test")
IWAE_CHUNK_ELEMENTS = 2**24  # decoded values per IWAE chunk (chunk * B * C*H*W): ~64 MB of float32 output


def set_grads_to_none(optimizer) -> None:
    """optimizer.zero_grad(set_to_none=True): every parameter's .grad dropped."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class VAEModule(pl.LightningModule):
    """VAE training / evaluation. model, objective, optim: the config sections as their dataclasses
    (`config.to_object(cfg.model)`); a plain dict or DictConfig is read against the schema first (a
    checkpoint's hyperparameters: their `asdict`). input_shape: (C, H, W); max_steps: the run's optimizer
    steps (cyclical KL period, cosine LR end); binarize: none | dynamic (Bernoulli resample every time) |
    threshold (x > 0.5)."""

    def __init__(
        self,
        model: ModelConfig | Mapping,
        objective: ObjectiveConfig | Mapping,
        optim: OptimConfig | Mapping,
        input_shape: Sequence[int],
        max_steps: int,
        binarize: str = "none",
    ):
        super().__init__()
        if binarize not in choices(Binarize):
            raise ValueError(f"unknown binarize {binarize!r}; expected one of {choices(Binarize)}")
        self.model_cfg: ModelConfig = section(model, ModelConfig)  # unknown keys, bad values: ConfigError
        self.objective_cfg: ObjectiveConfig = section(objective, ObjectiveConfig)
        self.optim_cfg: OptimConfig = section(optim, OptimConfig)
        input_shape, max_steps = [int(s) for s in input_shape], int(max_steps)
        # The hyperparameters saved are plain containers (the sections' asdict), so checkpoints hold no
        # config objects and load with weights-only unpickling; load_from_checkpoint passes them back here.
        self.save_hyperparameters({
            "model": dataclasses.asdict(self.model_cfg), "objective": dataclasses.asdict(self.objective_cfg),
            "optim": dataclasses.asdict(self.optim_cfg), "input_shape": input_shape, "max_steps": max_steps,
            "binarize": binarize})
        self.input_shape = tuple(input_shape)
        self.num_dims = math.prod(self.input_shape)  # data dims per example, for bits/dim
        self.max_steps = max_steps
        self.binarize = binarize
        if self.objective_cfg.kl_schedule == "cyclical" and max_steps <= 0:
            raise ValueError("objective.kl_schedule=cyclical needs max_steps > 0")
        self.vae = VAE(self.model_cfg, self.input_shape)
        self.sums = nn.ModuleDict({stage: ExactSums(self.model_cfg.latent_dim) for stage in STAGES})
        # training losses (detached, on the device) and their steps since the last check (_note_non_finite);
        # mutated in place, so noting one skips nn.Module.__setattr__
        self._losses: Dict[str, list] = {"recent": [], "blocks": [], "steps": []}
        # optim.grad_skip_norm: optimizer steps skipped so far (a device int64 scalar once training; the
        # checkpoint's `skipped_steps`), and this step's total gradient norm (for clipping and logging)
        self._skipped: Any = 0
        self.step_skipped: Optional[torch.Tensor] = None  # this step's skip decision (device bool), when skipping
        self._grad_norm: Optional[torch.Tensor] = None

    HPARAMS = ("model", "objective", "optim", "input_shape", "max_steps")  # what a training checkpoint carries

    @classmethod
    def from_checkpoint(cls, path, map_location: Any = "cpu") -> Tuple[VAEModule, Dict[str, Any]]:
        """(the module a training checkpoint holds, the checkpoint). Read with the weights-only unpickler
        (checkpointing.safe_load: no code in the file runs), then its checksum checked; hyperparameters saved
        as plain dicts, by any version, are read against the schema. CheckpointError naming the file when it
        is not a readable checkpoint, lacks the hyperparameters, its weights do not fit them, or is corrupt."""
        from pipeline.run.checkpointing import CheckpointError, checksum_problem, safe_load

        try:
            state = safe_load(path, map_location=map_location)
        except CheckpointError as e:
            raise CheckpointError(f"incompatible checkpoint: {e}") from None
        hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
        if not isinstance(hparams, dict) or "state_dict" not in state or any(k not in hparams for k in cls.HPARAMS):
            raise CheckpointError(f"incompatible checkpoint {path}: no VAEModule hyperparameters "
                                  f"({', '.join(cls.HPARAMS)}) and state_dict; expected a checkpoint written by "
                                  "pipeline.train")
        try:
            module = cls(**hparams)
            module.load_state_dict(state["state_dict"], strict=True)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            detail = " ".join(str(e).split())[:300]
            raise CheckpointError(f"incompatible checkpoint {path}: its weights do not fit its model config "
                                  f"({type(e).__name__}: {detail if len(first) < 60 else first[:300]})") from None
        if (problem := checksum_problem(state)) is not None:
            raise CheckpointError(f"corrupt checkpoint {path}: {problem}")
        return module, state

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets plain attributes on the module around every hook (~25 times a step); a name already
        # held as a plain attribute, given a value that is no tensor or module, needs none of nn.Module's
        # parameter / buffer / submodule bookkeeping (~1 us each on CPU).
        if name in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ---- data -------------------------------------------------------------------------------
    def to_float(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float in [0, 1] (binarized per `binarize`), on the image's device: fp32, or
        fp64 when the weights are (64-true). bf16 / fp16 weights (bf16-true) keep fp32 data: the model casts
        its input, and the likelihood compares with the exact pixel values."""
        dtype = torch.promote_types(self.vae.to_mu_logvar.weight.dtype, torch.float32)
        if image.dtype == torch.uint8 and dtype == torch.get_default_dtype():
            x = image / 255.0  # one kernel, computed in dtype: the same values as converting first
        else:
            x = image.to(dtype) / 255.0
        if self.binarize == "dynamic":
            x = (objectives.noise_rows(torch.rand, x, self._noise_rows(x.shape[0])) < x).to(x.dtype)
        elif self.binarize == "threshold":
            x = (x > 0.5).to(x.dtype)
        return x

    # ---- the objective ----------------------------------------------------------------------
    def _noise_rows(self, n: int) -> Optional[tuple[int, int]]:
        """Training noise is drawn for the whole global batch, alike on every rank (StepSeed seeds it from the
        step alone), and a rank uses its rows (rank * n ..: the layout puts rank r's samples there): a
        sample's noise does not depend on how many ranks share the batch, so a run resumed on another world
        size trains on the same noise. Costs R x the draws of one rank's batch (latents: R x B x D numbers)."""
        trainer = attached_trainer(self)
        if trainer is None or not self.training or trainer.world_size == 1:
            return None
        return trainer.global_rank * n, trainer.world_size * n

    def _terms(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One z ~ q(z|x) per example: recon, kl, elbo [B], kl_per_dim and mu [B, D] (nats)."""
        params, mu, logvar, _ = self.vae(x, self._noise_rows(x.shape[0]))
        terms = objectives.elbo_terms(x, params, mu, logvar, self.model_cfg.likelihood,
                                      self.model_cfg.gaussian_sigma)
        terms["mu"] = mu
        return terms

    def _kl_penalty(self, kl_per_dim: torch.Tensor):
        """(penalty, weight, capacity) at self.global_step; kl_per_dim [B, D] or the [1, D] epoch mean."""
        cfg = self.objective_cfg
        weight = schedules.kl_weight(self.global_step, cfg, self.max_steps)
        capacity = schedules.capacity_nats(self.global_step, cfg)
        penalty = objectives.kl_penalty(kl_per_dim, weight, capacity, gamma=cfg.gamma, free_bits=cfg.free_bits)
        return penalty, weight, capacity

    def _shared_step(self, batch: Dict[str, Any], stage: str) -> Optional[torch.Tensor]:
        x = self.to_float(batch["image"])
        if stage != "train":
            self.sums[stage].update(*self.evaluation_terms(x, self.objective_cfg.val_iwae_samples))
            return None
        terms = self._terms(x)
        penalty, weight, capacity = self._kl_penalty(terms["kl_per_dim"])
        recon = terms["recon"].mean()
        loss = recon + penalty
        self._note_non_finite(loss)
        if not self._writes_logs_this_step():
            return loss  # each self.log costs ~0.45 ms on CPU; loggers only write every N steps
        self._raise_if_non_finite()  # the loggers read this step's values anyway: no extra stall
        logged = {
            "loss": loss,
            "elbo": terms["elbo"].mean(),
            "recon": recon,
            "kl": terms["kl"].mean(),
            "bits_per_dim": objectives.bits_per_dim(-terms["elbo"], self.num_dims).mean(),
            "kl_weight": weight,
        }
        if capacity is not None:
            logged["capacity_nats"] = capacity
        for name, value in logged.items():  # on_step only: no cross-rank reduction
            value = value.detach() if torch.is_tensor(value) else float(value)
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, sync_dist=False,
                     batch_size=x.shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def on_validation_epoch_start(self):
        self.sums["val"].reset()  # fresh, process-local states, whatever ran before

    def on_test_epoch_start(self):
        self.sums["test"].reset()

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        metric = self.sums[stage]
        mean = metric.means()  # the one collective of the epoch: states summed over ranks
        metric.reset()
        if mean is None:
            return
        penalty, _, _ = self._kl_penalty(mean["kl_dim"][None].float())  # exact: depends on mean KL only
        values = {
            "loss": mean["recon"].item() + float(penalty),
            "elbo": mean["elbo"].item(),
            "recon": mean["recon"].item(),
            "kl": mean["kl"].item(),
            "bits_per_dim": float(objectives.bits_per_dim(-mean["elbo"], self.num_dims)),
            "active_units": float(active_units(mean["mu_variance"])),
        }
        values.update({f"kl_dim_{d}": v.item() for d, v in enumerate(mean["kl_dim"])})
        if self.objective_cfg.val_iwae_samples > 0:
            values["iwae"] = mean["iwae"].item()
        for name, value in values.items():
            # Already identical on every rank after the metric's sync: no further reduction.
            self.log(f"{stage}/{name}", value, sync_dist=False)

    # ---- optimizers -------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = list(self.parameters())
        trainer = attached_trainer(self)
        # fused: one kernel for the whole update on CUDA (accel.fused_adamw); None leaves torch's choice
        fused = accel.fused_adamw({p.device.type for p in params},
                                  getattr(trainer, "precision", "32-true") if trainer is not None else "32-true",
                                  getattr(trainer, "gradient_clip_val", 0) if trainer is not None else 0,
                                  cfg.grad_skip_norm is not None)
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused or None
        )
        # A pure function of the scheduler's step count, which the checkpoint restores. A skipped step
        # (optim.grad_skip_norm) still advances it, as it advances global_step and the KL schedule: every
        # schedule stays a function of the step, and knowing whether a step was skipped would take a host read.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedules.lr_factor(step, cfg, self.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ---- gradient norm: clipping and skipping, without a host read per step --------------------
    # Lightning calls on_before_optimizer_step after the backward pass (and DDP's all-reduce) and before
    # configure_gradient_clipping and optimizer.step. The total norm is taken once, on the device; a step whose
    # norm exceeds optim.grad_skip_norm (or is not finite) is skipped by the fused AdamW itself: it honours
    # `optimizer.found_inf` as GradScaler uses it (weights, moments and its step count unchanged; accel.py makes
    # AdamW fused on every device when skipping is on).
    def on_before_optimizer_step(self, optimizer) -> None:
        cfg = self.optim_cfg
        if cfg.grad_skip_norm is None and cfg.grad_clip_norm is None:
            self._grad_norm = None
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            self._grad_norm = None
            return
        norm = torch.nn.utils.get_total_norm(grads)
        self._grad_norm = norm
        if cfg.grad_skip_norm is not None:
            skip = ~(norm <= cfg.grad_skip_norm)  # NaN and inf norms are skipped too
            optimizer.found_inf = skip.to(torch.float32)
            self.step_skipped = skip  # the EMA (EMAWeights) leaves a skipped step out as well
            if not torch.is_tensor(self._skipped) or self._skipped.device != norm.device:
                self._skipped = torch.full((), int(self._skipped), dtype=torch.int64, device=norm.device)
            self._skipped.add_(skip)
        if self._writes_logs_this_step():
            self.log("train/grad_norm", norm.detach(), on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
            if cfg.grad_skip_norm is not None:
                self.log("train/skipped_steps", self._skipped.to(torch.float32), on_step=True, on_epoch=False,
                         sync_dist=False, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """optim.grad_clip_norm (Lightning's gradient_clip_val, norm algorithm) with the norm taken above: the same
        clip as torch.nn.utils.clip_grad_norm_, without computing the norm a second time."""
        if not gradient_clip_val:  # Lightning passes trainer.gradient_clip_val: no clipping, as its own path ends
            return
        if self._grad_norm is not None and gradient_clip_algorithm in (None, "norm"):
            params = [p for p in self.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        """What Lightning's default does, optimizer.zero_grad(set_to_none=True), without torch's profiler range and
        dynamo guard around it (~40 us of a ~2.5 ms digits step on CPU)."""
        set_grads_to_none(optimizer)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by optim.grad_skip_norm so far (a host read)."""
        return int(self._skipped)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._skipped = int(checkpoint.get("skipped_steps", 0))

    # ---- non-finite loss, without a host read per step ---------------------------------------
    # `if not torch.isfinite(loss)` waits for the device every step. Instead each step's loss is kept (detached,
    # on the device: one list append, no kernel) and checked where the host waits anyway or must know: on steps
    # whose metrics are written, before a validation and before any checkpoint is written (so none holds
    # weights trained after a non-finite loss: the last good one stays). Every LOSS_BLOCK losses are stacked
    # into one tensor (no host read), so a run that rarely checks keeps few tensors.
    LOSS_BLOCK = 256

    def _note_non_finite(self, loss: torch.Tensor) -> None:
        held = self._losses
        held["recent"].append(loss.detach())
        held["steps"].append(self.global_step)
        if len(held["recent"]) >= self.LOSS_BLOCK:
            held["blocks"].append(torch.stack(held["recent"]))
            held["recent"] = []

    def _first_non_finite(self) -> Optional[torch.Tensor]:
        """The step of the first non-finite loss held, as a device int64 scalar (int64 max: none; None: no loss
        held). Queues device work only; the losses checked are let go."""
        held = self._losses
        if not held["steps"]:
            held.pop("checked", None)
            return None
        losses = torch.cat(held["blocks"] + ([torch.stack(held["recent"])] if held["recent"] else []))
        steps = torch.tensor(held["steps"], dtype=torch.int64).to(losses.device, non_blocking=True)
        first = torch.where(torch.isfinite(losses), torch.iinfo(torch.int64).max, steps).min()
        held["checked"] = (losses, steps)  # for the loss value, once the host has read `first`
        held["recent"], held["blocks"], held["steps"] = [], [], []
        return first

    def _raise_if_non_finite(self, agree: bool = False) -> None:
        """FloatingPointError naming the first step with a non-finite loss, if there was one (one host read).
        agree: under DDP all ranks take part (one all-reduce) and raise together, at the first such step of any."""
        distributed = agree and attached_trainer(self) is not None and self.trainer.world_size > 1
        first = self._first_non_finite()
        if first is None and not distributed:
            return
        none = torch.iinfo(torch.int64).max
        if first is None:
            first = torch.full((), none, dtype=torch.int64, device=self.device)
        if distributed:
            first = first.to(self.device)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        at = int(first)
        if at == none:
            return
        losses, steps = self._losses.get("checked", (torch.zeros(0), torch.zeros(0, dtype=torch.int64)))
        here = torch.nonzero(steps == at)
        value = f"{float(losses[here[0, 0]])}" if len(here) else "on another rank"
        raise FloatingPointError(f"non-finite training loss ({value}) at global_step {at}")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._raise_if_non_finite(agree=True)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._raise_if_non_finite(agree=True)  # every rank writes (dumps) a checkpoint: all take part
        if self.optim_cfg.grad_skip_norm is not None:
            checkpoint["skipped_steps"] = self.skipped_steps  # a save waits for the device anyway

    def _writes_logs_this_step(self) -> bool:
        """Whether Lightning writes step metrics after this batch (every trainer.log_every_n_steps)."""
        trainer = attached_trainer(self)
        return trainer is None or logs_written_this_step(trainer)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Move only the tensors of a dict batch; Lightning's default also walks the list of keys."""
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- helpers for callbacks and evaluation (no logging) ----------------------------------
    def _iwae_chunk(self, batch_size: int) -> int:
        return max(1, IWAE_CHUNK_ELEMENTS // (batch_size * self.num_dims))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, C, H, W] -> decoder mean at z = E_q[z] (= mu), [B, C, H, W]."""
        mu, _ = self.vae.encode(x)
        return objectives.decoder_mean(self.vae.decode(mu), self.model_cfg.likelihood)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n decoder means at z ~ N(0, I), [n, C, H, W] (global RNG)."""
        z = torch.randn(n, self.model_cfg.latent_dim, device=self.device)
        return objectives.decoder_mean(self.vae.decode(z), self.model_cfg.likelihood)

    @torch.no_grad()
    def traverse(self, x: torch.Tensor, dims: Sequence[int], values: Sequence[float]) -> torch.Tensor:
        """Latent traversal around one input x [C, H, W] (or [1, C, H, W]): z = mu(x) with z_d set
        to each value. Returns [len(dims) * len(values), C, H, W], one row of len(values) per dim."""
        mu, _ = self.vae.encode(x.reshape(1, *self.input_shape))
        vals = torch.as_tensor(list(values), dtype=mu.dtype, device=mu.device)
        z = mu.repeat(len(dims) * len(vals), 1)  # [len(dims) * len(values), D]
        for i, d in enumerate(dims):
            z[i * len(vals):(i + 1) * len(vals), d] = vals
        return objectives.decoder_mean(self.vae.decode(z), self.model_cfg.likelihood)

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, k: int, chunk_size: Optional[int] = None) -> torch.Tensor:
        """IWAE bound with k samples (objectives.iwae_bound), nats per example, [B]; x float
        [B, C, H, W]. chunk_size None: as many samples per chunk as keep ~2^24 decoded values."""
        chunk = chunk_size or self._iwae_chunk(x.shape[0])
        return objectives.iwae_bound(x, self.vae.encode, self.vae.decode, self.model_cfg.likelihood,
                                     self.model_cfg.gaussian_sigma, k=k, chunk_size=chunk)

    @torch.no_grad()
    def evaluation_terms(self, x: torch.Tensor, iwae_samples: int = 0, chunk_size: Optional[int] = None
                         ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """What validation, test and pipeline.evaluate sum (ExactSums.update) for a float batch x
        [B, C, H, W]: the ELBO terms from one z ~ q(z|x) per example (see `elbo_batch`) and the IWAE
        bound [B] with `iwae_samples` samples (None for 0), both from this same x."""
        terms = self._terms(x)
        return terms, (self.iwae(x, iwae_samples, chunk_size) if iwae_samples > 0 else None)

    @torch.no_grad()
    def elbo_batch(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """A batch dict (uint8 `image`) -> recon, kl, elbo [B], kl_per_dim, mu [B, D], in nats, from
        one z ~ q(z|x) per example (binarized as in training)."""
        image = batch["image"].to(self.device)
        return self._terms(self.to_float(image))
