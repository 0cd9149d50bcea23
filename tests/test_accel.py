"""The accelerator defaults (pipeline/training/accel.py) as chosen for each device, and their wiring on CPU."""
from __future__ import annotations

import pytest
import torch

from pipeline.training import accel
from pipeline.training.module import VAEModule
from pipeline.training.train import _strategy


def test_fused_adamw_with_every_parameter_on_one_fused_device_and_never_where_lightning_cannot_clip():
    assert accel.fused_adamw({"cuda"}) is True
    assert accel.fused_adamw({"cuda"}, "bf16-mixed", 1.0) is True
    assert accel.fused_adamw({"cuda"}, "16-mixed", 0.0) is True
    assert accel.fused_adamw({"cuda"}, "16-mixed", 1.0) is False  # fp16 unscaling inside: no clipping
    assert accel.fused_adamw({"cpu"}) is True  # torch's CPU kernels: the default a CPU run gets (#23)
    assert accel.fused_adamw({"cpu"}, "64-true", 1.0) is True
    assert accel.fused_adamw({"meta"}) is False
    assert accel.fused_adamw({"cuda", "cpu"}) is False
    assert accel.fused_adamw(set()) is False


def test_fused_adamw_on_every_device_when_steps_may_be_skipped():
    """optim.grad_skip_norm: only the fused kernels honour optimizer.found_inf (CPU and CUDA)."""
    assert accel.fused_adamw({"cpu"}, "32-true", 0.0, skip=True) is True
    assert accel.fused_adamw({"cpu", "cuda"}, "bf16-mixed", 1.0, skip=True) is True
    assert accel.fused_adamw({"cuda"}, "32-true", 1.0, skip=True) is True
    assert accel.fused_adamw(set(), skip=True) is False
    assert accel.describe("cpu", True, None, None, None) == "cpu: fused AdamW on, torch defaults otherwise"
    module = VAEModule({"arch": "mlp", "latent_dim": 2, "hidden_dims": [8]}, {}, {"grad_skip_norm": 10.0}, (1, 4, 4),
                       max_steps=5)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True  # here, on the CPU


def test_tf32_and_cudnn_benchmark_on_cuda_only_and_benchmark_not_when_deterministic():
    assert accel.matmul_precision("cuda") == "high" and accel.matmul_precision("cpu") is None
    assert accel.cudnn_benchmark("conv", "cuda", deterministic=False) is True
    assert accel.cudnn_benchmark("conv", "cuda", deterministic=True) is None
    assert accel.cudnn_benchmark("mlp", "cuda", deterministic=False) is None
    assert accel.cudnn_benchmark("conv", "cpu", deterministic=False) is None


def test_ddp_strategy_has_gradients_as_bucket_views():
    assert accel.ddp_kwargs("ddp") == {"gradient_as_bucket_view": True}
    assert accel.ddp_kwargs("auto") is None and _strategy("auto") == "auto"
    strategy = _strategy("ddp")
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True}


def test_summary_line_says_what_was_chosen():
    line = accel.describe("cuda", True, "high", True, {"gradient_as_bucket_view": True})
    assert line == "fused AdamW on, fp32 matmul precision high, cudnn.benchmark on, DDP gradient_as_bucket_view"
    assert accel.describe("cpu", False, None, None, None) == "cpu: fused AdamW off, torch defaults otherwise"


@pytest.mark.parametrize("device_types,fused", [({"cpu"}, None), ({"cuda"}, True)])
def test_configure_optimizers_asks_for_fused_adamw_from_the_parameters_devices(device_types, fused, monkeypatch):
    module = VAEModule({"arch": "mlp", "latent_dim": 2, "hidden_dims": [8]}, {}, {}, (1, 4, 4), max_steps=5)
    made = {}
    real = torch.optim.AdamW

    def recording(params, **kwargs):
        made.update(kwargs)
        return real(params, **{**kwargs, "fused": None})  # no CUDA here to fuse on
    monkeypatch.setattr(torch.optim, "AdamW", recording)
    monkeypatch.setattr(accel, "fused_adamw", lambda types, *a: set(device_types) == {"cuda"})
    module.configure_optimizers()
    assert made["fused"] is fused


def test_evaluate_on_cuda_n_makes_gpu_n_the_current_device(monkeypatch):
    from pipeline.analysis.evaluate import use_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.append(dev))
    assert use_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert use_device(torch.device("cuda")) == torch.device("cuda")  # plain "cuda": the current one already
    assert use_device(torch.device("cpu")) == torch.device("cpu")
    assert chosen == [torch.device("cuda", 3)]
