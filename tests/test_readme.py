"""The README's promises that can drift: its two set-up commands, CI running the second one verbatim, and
every `python -m pipeline.X` it shows naming a module with a main()."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def top_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_a_train_and_a_test_command():
    train, test = top_commands()
    assert "python3 -m pipeline.train" in train and "pip install" in train
    assert test.endswith("python3 -m pytest") and '".[dev]"' in test


def test_ci_runs_the_readme_test_command_verbatim_in_a_fresh_venv():
    ci = (REPO / ".ci" / "run").read_text()
    assert top_commands()[1] in ci.splitlines()
    assert "python3 -m venv" in ci and "/bin/activate" in ci


def test_every_module_command_in_the_docs_has_a_main():
    docs = README + "".join(p.read_text() for p in [REPO / "data" / "README.md", *(REPO / "slurm").glob("*.sh"),
                                                   *(REPO / "configs").glob("*.yaml")])
    names = sorted(set(re.findall(r"python3? -m (pipeline(?:\.\w+)+)", docs)))
    assert "pipeline.train" in names
    for name in names:
        assert callable(getattr(importlib.import_module(name), "main", None)), f"{name} has no main()"
