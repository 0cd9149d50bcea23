"""Shared fixtures: the real config, shrunk to CPU-sized runs; digits shards prepared once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.run import TINY, run_train


@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory) -> Path:
    """Indexes of manifest-less local shards (pipeline.data.autoindex) go to a session directory, never to the
    user's ~/.cache; the runs a test starts inherit it through the environment."""
    from pipeline.data.autoindex import CACHE_ENV

    path = tmp_path_factory.mktemp("index-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: on 2 cores shared with other jobs, intra-op threads spin-wait for each other and
    cost 5-10x wall time (measured) while saving nothing. Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Digits shards, prepared once for the whole session (the recipe is the built-in default)."""
    from pipeline.config import load_config
    from pipeline.data.prepare import ensure_prepared

    root = tmp_path_factory.mktemp("data") / "digits"
    ensure_prepared(load_config([], [f"data.root={root}", "data.dataset=digits"]).data)
    return root


@pytest.fixture
def tiny_overrides(digits_root, tmp_path) -> list:
    return TINY + [f"data.root={digits_root}", f"run.dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def trained_run(digits_root, tmp_path_factory) -> Path:
    """One finished 20-step digits run (TINY) for the tests that only read a run: evaluate, checkpoint
    checks. A test that changes the run works on a copy (shutil.copytree)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_train([*TINY, "trainer.max_steps=20", f"data.root={digits_root}", f"run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def uneven(tmp_path_factory) -> Path:
    """Shards of uneven sizes (helpers.data.UNEVEN train, UNEVEN_VAL val, 5 test samples) with labels and
    factors: equal batches per rank must come from the layout, not from tidy shards."""
    from tests.helpers.data import UNEVEN, UNEVEN_VAL, write_dataset

    root = tmp_path_factory.mktemp("uneven")
    write_dataset(root, {"train": UNEVEN, "val": UNEVEN_VAL, "test": (5,)}, factors=True)
    return root


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads xdist_group into the node ids
def pytest_collection_modifyitems(config, items):
    """A test on the real SLURM cluster is slow too (it installs and starts one): `-m "not slow"` skips it.
    Under pytest-xdist (`-n 2`, the default in pyproject.toml) the SLURM tests share one worker: one cluster
    at a time on this host."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group("slurm"))


class XdistGroupIds:
    """pytest-xdist's --dist loadgroup sends the tests of one xdist_group to one worker by appending `@group` to
    their node ids, which it does by setting `item._nodeid`; pytest 9.2 (installed here) builds `nodeid` from
    `item._id` instead, so the suffix was lost and every test was scheduled on its own (two SLURM clusters at
    once). After xdist's hook: the suffix where it is missing."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
            return
        for item in items:
            groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                             for m in item.iter_markers("xdist_group")})
            if groups and "@" not in item.nodeid and hasattr(item, "_id"):
                from _pytest.nodeid import NodeId

                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


def pytest_configure(config):
    config.pluginmanager.register(XdistGroupIds(), "xdist-group-ids")
