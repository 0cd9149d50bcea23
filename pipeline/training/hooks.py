"""Cheaper Lightning hook dispatch for short steps.

Lightning calls every hook on every callback it holds, each call inside a profiler context named by an
f-string: six per-step hooks x eleven callbacks is ~65 dispatches a step, ~0.2 ms of a 3 ms digits step on
the 2-core development machine (median step time, grouped and not, alternating; README, Performance).
- `CallbackGroup` holds our callbacks as one: each hook goes only to the members that define it.
- `NullProfiler` is Lightning's default PassThroughProfiler without a generator per profiled call.
Both use public Lightning API (Callback, Profiler); behaviour is unchanged, only the dispatch is cheaper.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.profilers import PassThroughProfiler

# every hook a Callback can define, from Lightning's own base class (so a new hook is never dropped)
HOOKS = tuple(n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown"))
_NULL = contextlib.nullcontext()  # reusable: nullcontext holds no state


def _defines(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def _stands_alone(cb: Callback) -> bool:
    """Lightning finds checkpoint and progress-bar callbacks by type, and keys a callback's state by its own
    state_key: those must stay separate callbacks."""
    return isinstance(cb, (Checkpoint, ProgressBar)) or _defines(cb, "state_dict") or _defines(cb, "load_state_dict")


def _fan_out(fns: Sequence[Callable[..., Any]]) -> Callable[..., None]:
    if len(fns) == 1:
        return fns[0]

    def call(*args: Any, **kwargs: Any) -> None:
        for fn in fns:  # in member order; an exception stops the rest, as in Lightning's own loop
            fn(*args, **kwargs)

    return call


def _nothing(*_: Any, **__: Any) -> None:
    return None


class CallbackGroup(Callback):
    """Stateless callbacks behind one Lightning callback, called in the order given. Checkpoint and
    progress-bar callbacks stay outside (Lightning finds and orders them by type), and so do callbacks
    with a state_dict (their checkpoint key is their own)."""

    def __init__(self, members: Sequence[Callback]):
        for m in members:
            if _stands_alone(m):
                raise ValueError(f"{type(m).__name__} cannot join a CallbackGroup: Lightning needs it on its own")
        self.members = list(members)
        for hook in HOOKS:  # instance attributes: Lightning's getattr(callback, hook) finds them first
            fns = [getattr(m, hook) for m in self.members if _defines(m, hook)]
            setattr(self, hook, _fan_out(fns) if fns else _nothing)

    def __repr__(self) -> str:
        return f"CallbackGroup({', '.join(type(m).__name__ for m in self.members)})"


def grouped(callbacks: Sequence[Callback]) -> list[Callback]:
    """The callbacks that may share one dispatch as a CallbackGroup (at the place of the first of them), the
    others (checkpoints, progress bar, stateful) as they are, in their order."""
    members = [c for c in callbacks if not _stands_alone(c)]
    if len(members) < 2:
        return list(callbacks)
    out: list[Callback] = []
    for c in callbacks:
        if _stands_alone(c):
            out.append(c)
        elif c is members[0]:
            out.append(CallbackGroup(members))
    return out


class NullProfiler(PassThroughProfiler):
    """No profiling, as Lightning's default, at the cost of one shared context object per profiled call."""

    def profile(self, action_name: str):  # type: ignore[override]
        return _NULL
