"""Counting host-device syncs on a CPU: the calls that would stall a GPU's stream, found by patching torch.

On a CPU a sync costs nothing, so none shows in a timing; on a GPU each one makes the host wait for the queued
kernels, and the next step cannot be queued while this one runs. ``SyncCounter`` patches the Python entry points of
those calls and counts them while it is ``active``; ``SyncWindow`` turns it on for a span of training steps.

Counted: ``Tensor.item``, ``.tolist``, ``.numpy``, ``.cpu``, ``bool()``, ``float()``, ``int()``, ``operator.index``
of a tensor; ``torch.tensor`` / ``torch.as_tensor`` given a ``device`` (a blocking copy from pageable host memory on
CUDA); boolean-mask indexing and assignment, ``torch.unique``, ``nonzero`` and ``masked_select`` (data-dependent
shapes). Calls made by the data pipeline (``torch.utils.data``, ``segvoc/data``) and by ``torch.optim`` (its step
counters are CPU tensors) are host-side on a GPU too and are not counted, except ``data.device_augment``'s
``augment_batch``, which runs on the device. Kernels that sync inside C++ (CUDA
``bincount``, which reads its input's maximum back) are invisible here; ``torch.cuda.set_sync_debug_mode`` sees
those on a GPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from torch.overrides import TorchFunctionMode

# host-side on a GPU run too: anything the loader calls, and torch.optim's own reads of its step counters (CPU
# tensors unless capturable/fused; only the direct caller: the training step itself runs inside optimizer.step)
HOST_SIDE = ("torch/utils/data/", "segvoc/data/")
# ...except what runs on the device after the transfer (data.device_augment): counted
DEVICE_SIDE = ("segvoc/data/device_augment.py:augment_batch",)
HOST_SIDE_CALLERS = ("torch/optim/",)
_TENSOR_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "unique",
                   "nonzero", "masked_select")
_TORCH_FUNCTIONS = ("unique", "nonzero", "masked_select")


def _is_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


class _BoolMaskIndexing(TorchFunctionMode):
    """Records boolean-mask indexing and assignment (data-dependent shapes) through ``record``."""

    def __init__(self, record: Any, originals: dict[Any, Any]) -> None:
        super().__init__()
        self.record, self.originals = record, originals

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.__getitem__ and len(args) > 1 and _is_bool_mask(args[1]):
            self.record("bool-mask index")
        elif func is torch.Tensor.__setitem__ and len(args) > 1 and _is_bool_mask(args[1]):
            self.record("bool-mask assign")
        # torch hands a patched method back here by name: call what it wraps, or the call would count twice
        return self.originals.get(func, func)(*args, **(kwargs or {}))


class SyncCounter:
    """Context manager patching torch; ``counts[(phase, call, "file:line")]`` while ``active`` names a phase
    (``"train"``, ``"eval"``; ``None``: not counting). Not thread-aware: use it around one loop at a time."""

    def __init__(self, host_side: tuple[str, ...] = HOST_SIDE,
                 host_side_callers: tuple[str, ...] = HOST_SIDE_CALLERS) -> None:
        self.host_side, self.host_side_callers = host_side, host_side_callers
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.active: str | None = None
        self._saved: list[tuple[Any, str, Any]] = []
        self._inside = False
        self._mode: _BoolMaskIndexing | None = None
        self._originals: dict[Any, Any] = {}

    def total(self, phase: str = "train") -> int:
        return sum(n for (p, _, _), n in self.counts.items() if p == phase)

    def _record(self, name: str) -> None:
        if not self.active or self._inside:
            return
        self._inside = True
        try:
            frame = sys._getframe(2)
            site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            if any(h in site.replace("\\", "/") for h in self.host_side_callers):
                return
            stack, f = [], frame
            while f is not None:
                stack.append(f"{f.f_code.co_filename}:{f.f_code.co_name}".replace("\\", "/"))
                f = f.f_back
            on_device = any(d in where for where in stack for d in DEVICE_SIDE)
            if not on_device and any(h in where for where in stack for h in self.host_side):
                return
            self.counts[(self.active, name, site)] += 1
        finally:
            self._inside = False

    def _patch(self, owner: Any, attr: str, wrapper_for: Any) -> None:
        original = getattr(owner, attr)
        # inherited from the C base: deleted again on exit rather than set on ``torch.Tensor`` itself
        self._saved.append((owner, attr, original if attr in vars(owner) else None))
        wrapper = wrapper_for(original)
        self._originals[wrapper] = original
        setattr(owner, attr, wrapper)

    def __enter__(self) -> SyncCounter:
        record = self._record

        def method(name: str) -> Any:
            def wrap(original: Any) -> Any:
                def counted(self_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                    record(name)
                    return original(self_, *args, **kwargs)
                return counted
            return wrap

        def function(name: str, only_with_device: bool = False) -> Any:
            def wrap(original: Any) -> Any:
                def counted(*args: Any, **kwargs: Any) -> Any:
                    if not only_with_device or kwargs.get("device") is not None:
                        record(name)
                    return original(*args, **kwargs)
                return counted
            return wrap

        for name in _TENSOR_METHODS:
            self._patch(torch.Tensor, name, method(name))
        for name in _TORCH_FUNCTIONS:
            self._patch(torch, name, function(f"torch.{name}"))
        self._patch(torch, "tensor", function("torch.tensor(device=)", only_with_device=True))
        self._patch(torch, "as_tensor", function("torch.as_tensor(device=)", only_with_device=True))
        # indexing through a mode, not by patching: ``__getitem__`` set on ``torch.Tensor`` (even set back or deleted)
        # leaves a Python-level sequence slot behind, after which ``torch.tensor([t0, t1])`` of 0-d tensors fails
        self._mode = _BoolMaskIndexing(record, self._originals)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = None
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        while self._saved:
            owner, attr, original = self._saved.pop()
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._originals.clear()

    def report(self, top: int = 12) -> str:
        """The most frequent (phase, call, site) triples, one a line."""
        return "\n".join(f"{n:5d}  {phase:<5} {name:<28} {site}"
                         for (phase, name, site), n in self.counts.most_common(top))


class SyncWindow(Callback):
    """Counts the ``"train"`` phase from the start of training batch ``start`` to the start of batch
    ``start + steps`` (whole step cycles: hooks, logging, progress bar, the next fetch), and the ``"eval"`` phase
    inside each validation batch after the sanity check (``eval_batches`` of them)."""

    def __init__(self, counter: SyncCounter, start: int, steps: int) -> None:
        self.counter, self.start, self.steps = counter, start, steps
        self.done = False
        self.eval_batches = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.start:
            self.counter.active = "train"
        elif batch_idx == self.start + self.steps:
            self.counter.active = None
            self.done = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.counter.active = None

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.counter.active = "eval"

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.counter.active == "eval":
            self.eval_batches += 1
        self.counter.active = None

    @property
    def per_step(self) -> float:
        if not self.done:
            raise RuntimeError(f"the fit ended before batch {self.start + self.steps}: no full window counted")
        return self.counter.total("train") / self.steps

    @property
    def per_eval_batch(self) -> float:
        return self.counter.total("eval") / max(1, self.eval_batches)


def training_syncs(cfg: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Fit ``cfg`` for one epoch (its DataModule, callbacks, loggers and progress bar) and count the syncs of
    ``steps`` training steps after ``warmup`` and of each validation batch: ``{"per_step", "per_eval_batch",
    "eval_batches", "counter"}``. The training split must hold at least ``warmup + steps + 1`` batches."""
    from omegaconf import open_dict

    from segvoc.engine.builders import build_datamodule, build_task, build_trainer

    with open_dict(cfg):
        cfg.trainer.update(max_epochs=1, limit_train_batches=warmup + steps + 1, num_sanity_val_steps=0)
    dm = build_datamodule(cfg)
    task = build_task(cfg, pretrained=False)
    trainer = build_trainer(cfg)
    counter = SyncCounter()
    window = SyncWindow(counter, warmup, steps)
    trainer.callbacks.append(window)
    with counter:
        trainer.fit(task, datamodule=dm)
    return {"per_step": window.per_step, "per_eval_batch": window.per_eval_batch,
            "eval_batches": window.eval_batches, "counter": counter}
