"""``perf.cudnn_benchmark``: cuDNN autotuning on while training, off while evaluating and under determinism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from segvoc.engine.perf import CudnnBenchmark


@pytest.fixture()
def restore_flags():
    """Start from PyTorch's defaults (another test in this process may have turned determinism on), and put the
    flags back afterwards."""
    bench, det = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.backends.cudnn.benchmark = bench
    torch.use_deterministic_algorithms(det)


def test_on_for_training_off_for_evaluation(restore_flags):
    cb = CudnnBenchmark(True)
    fitting = SimpleNamespace(training=True)
    cb.on_train_epoch_start(fitting, None)
    assert torch.backends.cudnn.benchmark
    cb.on_validation_start(SimpleNamespace(training=False), None)
    assert not torch.backends.cudnn.benchmark
    cb.on_validation_end(fitting, None)  # validation inside fit hands back to training
    assert torch.backends.cudnn.benchmark
    cb.on_test_start(SimpleNamespace(training=False), None)
    assert not torch.backends.cudnn.benchmark
    CudnnBenchmark(False).on_train_epoch_start(fitting, None)
    assert not torch.backends.cudnn.benchmark


def test_never_on_under_deterministic_algorithms(restore_flags):
    torch.use_deterministic_algorithms(True)
    CudnnBenchmark(True).on_train_epoch_start(SimpleNamespace(training=True), None)
    assert not torch.backends.cudnn.benchmark


def test_the_trainer_gets_it_from_perf(tmp_path):
    from segvoc.config import compose
    from segvoc.engine.builders import build_trainer

    for value in (True, False):
        cfg = compose([f"paths.output_dir={tmp_path}", f"perf.cudnn_benchmark={str(value).lower()}", "logger=none"])
        found = [c for c in build_trainer(cfg).callbacks if isinstance(c, CudnnBenchmark)]
        assert len(found) == 1 and found[0].enabled is value
