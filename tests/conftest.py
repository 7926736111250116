import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def baseline_dir(tmp_path_factory) -> Path:
    """A ResNet-20 baseline on digits at 16x16, trained briefly: enough to be far above chance."""
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec

    out = tmp_path_factory.mktemp("baseline")
    train_baseline("resnet20", DatasetSpec(name="digits", image_size=16), epochs=3, out_dir=out, lr=0.05)
    return out


@pytest.fixture
def spec_dict(tmp_path, baseline_dir) -> dict:
    """A rapid trial spec on the session baseline, writing into this test's tmp folder."""
    return {
        "name": "t",
        "model": {"name": "resnet20"},
        "dataset": {"name": "digits", "image_size": 16},
        "baseline": {"checkpoint": str(baseline_dir / "baseline.pt")},
        "pruning": {"groups": [
            {"name": "layer1", "patterns": ["layer1.*.conv1"], "sparsity": 0.5},
            {"name": "layer3", "patterns": ["layer3.*.conv1"], "sparsity": 0.75},
        ]},
        "benchmark": {"rounds": 2, "iterations": 20, "warmup": 5},
        "artifacts": str(tmp_path / "trials"),
        "db": f"sqlite:///{tmp_path / 'results.db'}",
    }
