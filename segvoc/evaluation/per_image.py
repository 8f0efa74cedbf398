"""Per-image rows of one split (confusion matrices, boundary counts, calibration bins), gathered exactly.

Rows stay on the device while a split is scored (no per-batch host sync); at the end of the split they are moved
to the host once and gathered from every rank (``all_gather_object``, no padding: each rank holds its own shard),
then ordered by the split's id list.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from segvoc.data.palette import IGNORE_INDEX


def per_image_confusion(preds: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, C, C) int64 per image, rows = truth, columns = prediction, 255 ignored; one ``bincount``, no sync."""
    n = target.shape[0]
    t = target.reshape(n, -1).long()
    p = preds.reshape(n, -1).long()
    cc = num_classes * num_classes
    image = torch.arange(n, device=t.device).view(-1, 1)
    idx = torch.where(t != ignore_index, image * cc + t * num_classes + p, torch.full_like(t, n * cc))
    return torch.bincount(idx.reshape(-1), minlength=n * cc + 1)[:-1].reshape(n, num_classes, num_classes)


class PerImageRows:
    """Collects named per-image tensors with their ids during one scoring of a split."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.rows: dict[str, list[torch.Tensor]] = {}

    def add(self, ids: list[str], **rows: torch.Tensor) -> None:
        self.ids += list(ids)
        for name, value in rows.items():
            self.rows.setdefault(name, []).append(value.detach())

    def reset(self) -> None:
        self.ids, self.rows = [], {}

    def gather(self, order: list[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """Every rank's ids and rows (numpy), in the order of ``order`` (the split's id list) when given, else as
        gathered; a partial pass (sanity check, ``limit_val_batches``) gives only the ids it scored."""
        local = (self.ids, {k: torch.cat(v).cpu().numpy() for k, v in self.rows.items() if v})
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        ids = [i for part_ids, _ in parts for i in part_ids]
        names = [k for _, part in parts for k in part]
        rows = {k: np.concatenate([part[k] for _, part in parts if k in part]) for k in dict.fromkeys(names)}
        if order is not None and ids:  # the split's order; ids outside it (none, normally) keep theirs, last
            position = {i: k for k, i in enumerate(order)}
            pick = np.array(sorted(range(len(ids)), key=lambda k: (position.get(ids[k], len(order)), k)),
                            dtype=np.int64)
            ids, rows = [ids[k] for k in pick], {k: v[pick] for k, v in rows.items()}
        return ids, rows
