"""No host-device sync per training step: counted on the CPU by patching the calls that would stall a GPU
(``segvoc.bench.syncs``), over 20 steady-state steps of the 4a recipe with 2 workers, the progress bar on and
logging every 100 steps; and the counter itself sees each kind of call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segvoc.bench.syncs import SyncCounter, training_syncs
from tests.conftest import make_cfg

WARMUP, STEPS = 3, 20


@pytest.fixture(scope="module")
def sync_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough small images for one epoch of WARMUP + STEPS + 1 batches of one image, plus two val images."""
    from segvoc.data.synthetic import generate

    root = tmp_path_factory.mktemp("syncs") / "synthetic"
    generate(root, num_train=WARMUP + STEPS + 2, num_val=2, height=37, width=45, seed=0)
    return root


def _count(tmp_path: Path, root: Path, loss: str) -> dict:
    cfg = make_cfg(tmp_path, "experiment=4a_baseline", "data=synthetic", "data.synthetic=null", f"loss={loss}",
                   "data.batch_size=1", "data.image_size=32", "data.num_workers=2", "trainer.log_every_n_steps=100",
                   "model.encoder_channels=[4,4,4,4,4]", "model.decoder_channels=[4,4,4,4,4]",
                   "trainer.enable_model_summary=false", "logger=tensorboard", data_root=root)
    cfg.trainer.enable_progress_bar = True  # make_cfg turns it off; the bar is one of the things counted
    return training_syncs(cfg, WARMUP, STEPS)


@pytest.mark.parametrize("loss", ["ce", "dice", *(pytest.param(name, marks=pytest.mark.slow)
                                                   for name in ("weighted_ce", "focal", "ohem"))])
def test_no_host_sync_between_logging_steps(tmp_path, sync_root, loss):
    result = _count(tmp_path, sync_root, loss)
    assert result["per_step"] == 0, f"syncs per training step with loss={loss}:\n{result['counter'].report()}"
    # evaluation: the confusion matrix (index_add_ on a where-mapped index) and the loss mean add none either
    assert result["eval_batches"] >= 1
    assert result["per_eval_batch"] == 0, f"syncs per eval batch with loss={loss}:\n{result['counter'].report()}"


def test_an_item_in_training_step_is_counted(tmp_path, sync_root, monkeypatch):
    """The regression the test above guards against: one ``.item()`` per step shows as one sync per step."""
    from segvoc.engine.task import SegmentationTask

    original = SegmentationTask.training_step

    def with_item(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        loss.item()
        return loss

    monkeypatch.setattr(SegmentationTask, "training_step", with_item)
    result = _count(tmp_path, sync_root, "ce")
    assert result["per_step"] == 1, result["counter"].report()


def test_counter_sees_each_kind_of_sync_and_skips_the_data_pipeline():
    x = torch.arange(6.0)
    mask = x > 2
    with SyncCounter() as counter:
        counter.active = "train"
        x.sum().item()
        x.tolist()
        x.numpy()
        x.cpu()
        bool(x[0])
        float(x[1])
        int(x[2])
        x[mask]
        x[mask] = 0.0
        torch.unique(x)
        x.nonzero()
        torch.as_tensor(3, device=x.device)
        torch.tensor([1.0], device=x.device)
        torch.tensor([1.0])  # host data staying on the host: not a sync
        x[1:3]  # a view: not a sync
        counter.active = None
        x.sum().item()  # outside the window
    assert counter.total("train") == 13, counter.report()
    assert torch.Tensor.item is not None and counter.total("train") == 13  # patches are gone
    with SyncCounter() as counter:
        counter.active = "train"
        from segvoc.data.sampling import EpochShuffleSampler

        list(EpochShuffleSampler(5))  # its permutation's .tolist() is host-side on a GPU run too
    assert counter.total("train") == 0, counter.report()


def test_counter_leaves_torch_as_it_found_it():
    """After counting, ``torch.Tensor`` has the same attributes and a 0-d tensor is still no sequence: patching
    ``__getitem__`` on the class (even set back) made ``torch.tensor([t0, t1])`` of 0-d tensors fail for the rest of
    the process ("len() of a 0-d tensor"), which broke later tests in the suite."""
    before = dict(vars(torch.Tensor))
    with SyncCounter() as counter:
        counter.active = "train"
        torch.arange(3.0)[torch.tensor([True, False, True])]
    assert counter.total("train") == 1
    assert dict(vars(torch.Tensor)) == before
    assert torch.tensor([torch.tensor(0.5), torch.tensor(0.25)]).tolist() == [0.5, 0.25]


def test_progress_bar_shows_the_loss_read_at_logging_steps(tmp_path, sync_root):
    """The bar's loss changes only at logging steps (every 3rd here) and is the loss logged there."""
    from segvoc.engine.builders import build_datamodule, build_task, build_trainer
    from segvoc.engine.progress import _LossAtLoggingSteps

    cfg = make_cfg(tmp_path, "data=synthetic", "data.synthetic=null", "data.batch_size=1", "data.image_size=32",
                   "data.num_workers=0", "trainer.log_every_n_steps=3", "trainer.max_epochs=1",
                   "+trainer.limit_train_batches=7", "+trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                   "model.encoder_channels=[4,4,4,4,4]", "model.decoder_channels=[4,4,4,4,4]", "logger=none",
                   "trainer.enable_model_summary=false", data_root=sync_root)
    cfg.trainer.enable_progress_bar = True
    trainer = build_trainer(cfg)
    bar = next(c for c in trainer.callbacks if isinstance(c, _LossAtLoggingSteps))
    seen: list[tuple[int, float | None, float]] = []
    original = type(bar).get_metrics

    def spy(self, trainer, pl_module):
        items = original(self, trainer, pl_module)
        if trainer.training:
            logged = trainer.logged_metrics.get("train/loss_step")
            seen.append((trainer.global_step, items.get("loss"), float(logged) if logged is not None else None))
        return items

    type(bar).get_metrics = spy
    try:
        trainer.fit(build_task(cfg, pretrained=False), datamodule=build_datamodule(cfg))
    finally:
        type(bar).get_metrics = original
    shown = {step: loss for step, loss, _ in seen if step <= 7}
    assert shown[1] is None and shown[2] is None  # nothing read before the first logging step
    assert shown[3] == pytest.approx(next(lg for s, _, lg in seen if s == 3), abs=1e-4)
    assert shown[4] == shown[5] == shown[3]  # held between logging steps
    assert shown[6] != shown[3] and shown[6] == pytest.approx(next(lg for s, _, lg in seen if s == 6), abs=1e-4)
