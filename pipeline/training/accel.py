"""What a run sets for its accelerator: pure choices from the config and the chosen device, each tested on CPU.

    fused_adamw(device_types, precision, clip, skip)   AdamW's fused kernels (CPU and CUDA: not ~10 ops per tensor)
    matmul_precision(device_type)                "high" (TF32) on CUDA, torch's "highest" elsewhere
    cudnn_benchmark(arch, device_type, deterministic)   autotuned cuDNN kernels for fixed-shape conv runs
    ddp_kwargs(strategy)                         DDP without gradient copies (gradient_as_bucket_view)
    describe(...)                                the start-up summary's line for them

No torch.cuda call here: a CPU run on a GPU machine must not open a CUDA context.
"""
from __future__ import annotations

from typing import Iterable, Optional

FUSED_DEVICES = ("cpu", "cuda")  # where torch (>= 2.4) has fused AdamW kernels for every float dtype


def fused_adamw(device_types: Iterable[str], precision: str = "32-true", gradient_clip_val: float = 0.0,
                skip: bool = False) -> bool:
    """Fused AdamW when every parameter is on one device type with fused kernels (CUDA: one launch per step; CPU:
    one vectorised pass per tensor instead of ~10 ops each, 10-20% of a small MLP's step; the same update up to
    float rounding). Not under 16-mixed with gradient clipping: a fused optimizer unscales fp16 gradients itself,
    so Lightning refuses to clip them. On every device when steps may be skipped (optim.grad_skip_norm): only
    the fused kernels honour `optimizer.found_inf`, on the device, without a host read (16-mixed, whose
    GradScaler sets found_inf itself, is refused with it by config.validate)."""
    types = set(device_types)
    if skip and types:
        return True
    if len(types) != 1 or not types <= set(FUSED_DEVICES):
        return False
    return not (precision == "16-mixed" and (gradient_clip_val or 0) > 0)


def matmul_precision(device_type: str) -> Optional[str]:
    """torch.set_float32_matmul_precision for the run: "high" (TF32 tensor cores: 10-bit mantissa products,
    fp32 accumulation) on CUDA; None elsewhere (leave torch's default)."""
    return "high" if device_type == "cuda" else None


def cudnn_benchmark(arch: str, device_type: str, deterministic: bool) -> Optional[bool]:
    """Trainer(benchmark=): True for the conv model on CUDA (every training batch has the same shape, so the
    autotuning happens once), unless trainer.deterministic (autotuning may pick non-deterministic kernels);
    None: Lightning's default (benchmark follows deterministic)."""
    if device_type == "cuda" and arch == "conv" and not deterministic:
        return True
    return None


def ddp_kwargs(strategy: str) -> Optional[dict]:
    """DDPStrategy kwargs for trainer.strategy=ddp: gradients are views into DDP's all-reduce buckets (no
    copy per step, less memory). None for other strategies (left as named)."""
    return {"gradient_as_bucket_view": True} if strategy == "ddp" else None


def describe(device_type: str, fused: bool, matmul: Optional[str], benchmark: Optional[bool],
             ddp: Optional[dict]) -> str:
    """One line for the start-up summary."""
    if device_type != "cuda":
        return (f"{device_type}: fused AdamW {'on' if fused else 'off'}, torch defaults otherwise"
                + (", DDP gradient_as_bucket_view" if ddp else ""))
    parts = [f"fused AdamW {'on' if fused else 'off'}", f"fp32 matmul precision {matmul or 'highest'}",
             f"cudnn.benchmark {'on' if benchmark else 'off'}"]
    if ddp:
        parts.append("DDP gradient_as_bucket_view")
    return ", ".join(parts)
