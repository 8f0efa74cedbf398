"""Every loss against a hand computation on tiny tensors, with ignored (255) pixels and a class absent from the
batch; invariance to log-softmax inputs; float32 reduction under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from segvoc.losses.segmentation import LOSSES, CrossEntropy, Dice, Focal, Lovasz, OHEMCrossEntropy, WeightedSum

C = 4  # class 3 never appears in the targets below


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, C, 3, 4, generator=g)
    target = torch.tensor([[[0, 0, 1, 255], [0, 2, 1, 1], [255, 0, 0, 2]],
                           [[1, 1, 0, 0], [2, 2, 255, 0], [0, 0, 0, 1]]])
    return logits, target


def _valid(logits, target):
    """(probabilities (P,C), labels (P,)) of the non-ignored pixels, for the hand computations."""
    keep = target != 255
    return logits.softmax(1).permute(0, 2, 3, 1)[keep], target[keep]


def test_cross_entropy_by_hand():
    logits, target = _batch()
    p, y = _valid(logits, target)
    nll = -p[torch.arange(len(y)), y].log()
    assert CrossEntropy(C)(logits, target).item() == pytest.approx(nll.mean().item(), rel=1e-5)
    w = torch.tensor([0.5, 2.0, 3.0, 0.0])
    expected = (w[y] * nll).sum() / w[y].sum()
    assert CrossEntropy(C, weight=w)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_deterministic_cross_entropy_equals_the_fused_mean(weighted):
    """trainer=gpu_exact on CUDA: F.cross_entropy's mean (nll_loss2d, atomicAdd) raises in deterministic mode, so
    the per-pixel losses are summed instead; the same value and gradient (checked on the CPU, where both run)."""
    from segvoc.losses.segmentation import cross_entropy

    logits, target = _batch()
    w = torch.tensor([0.5, 2.0, 3.0, 0.0]) if weighted else None
    values, grads = [], []
    for deterministic in (False, True):
        x = logits.clone().requires_grad_(True)
        loss = cross_entropy(x, target, w, 255, deterministic=deterministic)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    assert torch.allclose(values[0], values[1], rtol=1e-6, atol=0) and torch.allclose(grads[0], grads[1], atol=1e-7)
    assert values[0] > 0 and grads[0].abs().sum() > 0


def test_focal_by_hand_and_gamma_zero_is_cross_entropy():
    logits, target = _batch()
    p, y = _valid(logits, target)
    pt = p[torch.arange(len(y)), y]
    w = torch.tensor([0.5, 2.0, 3.0, 0.0])
    expected = (w[y] * (1 - pt) ** 2 * -pt.log()).sum() / w[y].sum()
    assert Focal(C, weight=w, gamma=2.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert Focal(C, gamma=0.0)(logits, target).item() == pytest.approx(CrossEntropy(C)(logits, target).item(),
                                                                       rel=1e-6)


def test_dice_by_hand_over_present_classes_only():
    logits, target = _batch()
    p, y = _valid(logits, target)
    dices = []
    for c in (0, 1, 2):  # class 3 is absent: it must not count (smp alone would average it in as 0)
        t = (y == c).float()
        dices.append(2 * (p[:, c] * t).sum() / (p[:, c].sum() + t.sum()))
    expected = 1 - torch.stack(dices).mean()
    assert Dice(C)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    w = torch.tensor([1.0, 2.0, 3.0, 5.0])
    weighted = 1 - (torch.stack(dices) * w[:3]).sum() / w[:3].sum()
    assert Dice(C, weight=w)(logits, target).item() == pytest.approx(weighted.item(), rel=1e-5)


def _lovasz_softmax_reference(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Berman et al. (2018), Algorithm 1, written out: per present class, errors sorted descending, times the
    increments of the Jaccard loss along that order; mean over present classes."""
    losses = []
    for c in torch.unique(y).tolist():
        fg = (y == c).float()
        errors = (fg - p[:, c]).abs()
        order = errors.argsort(descending=True)
        fg_sorted = fg[order]
        jaccard = []
        for k in range(1, len(order) + 1):
            inter = fg.sum() - fg_sorted[:k].sum()
            union = fg.sum() + (1 - fg_sorted[:k]).sum()
            jaccard.append(1 - inter / union)
        grad = torch.tensor(jaccard)
        grad[1:] = grad[1:] - grad[:-1].clone()
        losses.append((errors[order] * grad).sum())
    return torch.stack(losses).mean()


def test_lovasz_by_hand():
    logits, target = _batch()
    p, y = _valid(logits, target)
    expected = _lovasz_softmax_reference(p, y)
    assert Lovasz(C)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_lovasz_refuses_class_weights():
    from segvoc.errors import ConfigError

    with pytest.raises(ConfigError, match="loss=lovasz has no class weights"):
        Lovasz(C, weight=[1.0] * C)


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    logits, target = _batch()
    easy = (torch.arange(target.numel()).view_as(target) % 2 == 0) & (target != 255)
    logits = logits + 5.0 * torch.nn.functional.one_hot(torch.where(easy, target, 3), C).permute(0, 3, 1, 2) * \
        easy.unsqueeze(1)  # every other pixel made easy: a confident, correct score
    p, y = _valid(logits, target)
    pt = p[torch.arange(len(y)), y]
    nll = -pt.log()
    hard = pt < 0.7
    assert 0 < hard.sum() < len(y)  # the example has both kinds
    assert OHEMCrossEntropy(C, thresh=0.7, min_kept=1)(logits, target).item() == pytest.approx(
        nll[hard].mean().item(), rel=1e-5)
    # min_kept is per image: x 2 images it exceeds the hard pixels, so the threshold rises to the probability of
    # the (2 min_kept + 1)-th hardest pixel and more pixels are kept
    min_kept = int(hard.sum()) // 2 + 2
    kept = pt < max(0.7, pt.sort().values[2 * min_kept].item())
    assert kept.sum() > hard.sum()
    assert OHEMCrossEntropy(C, thresh=0.7, min_kept=min_kept)(logits, target).item() == pytest.approx(
        nll[kept].mean().item(), rel=1e-5)


def test_ce_dice_is_the_weighted_sum():
    logits, target = _batch()
    both = WeightedSum(C, terms={"ce": 1.0, "dice": 0.5})(logits, target)
    assert both.item() == pytest.approx((CrossEntropy(C)(logits, target) + 0.5 * Dice(C)(logits, target)).item(),
                                        rel=1e-6)


def _losses(weighted: bool = False) -> dict[str, torch.nn.Module]:
    w = [0.5, 2.0, 3.0, 0.0] if weighted else None
    out = {name: cls(C, weight=w) for name, cls in LOSSES.items() if not (weighted and name == "lovasz")}
    out["ce_dice"] = WeightedSum(C, weight=w)
    return out


@pytest.mark.parametrize("name", [*LOSSES, "ce_dice"])
def test_ignored_pixels_do_not_count_and_log_probs_give_the_same_loss(name):
    loss = _losses()[name]
    logits, target = _batch()
    base = loss(logits, target)
    changed = logits.clone()
    changed[target.unsqueeze(1).expand_as(changed) == 255] = 50.0  # arbitrary scores on ignored pixels
    assert loss(changed, target).item() == pytest.approx(base.item(), rel=1e-6)
    # evaluation after TTA passes log-probabilities: a softmax-based loss must not change
    assert loss(logits.log_softmax(1), target).item() == pytest.approx(base.item(), rel=1e-5)
    assert math.isfinite(base.item()) and base.dtype == torch.float32


@pytest.mark.parametrize("name", [*LOSSES, "ce_dice"])
def test_losses_reduce_in_float32_under_bf16_autocast(name):
    loss = _losses()[name]
    logits, target = _batch(1)
    model = torch.nn.Conv2d(C, C, 1)
    torch.nn.init.eye_(model.weight.view(C, C))
    torch.nn.init.zeros_(model.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(logits)
        assert out.dtype == torch.bfloat16
        value = loss(out, target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(out.float(), target).item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(model.weight.grad).all()


def test_aux_output_adds_weighted_aux_loss():
    for loss in _losses().values():
        loss.aux_weight = 0.4
        logits, target = _batch()
        aux = torch.randn_like(logits)
        assert loss({"out": logits, "aux": aux}, target).item() == pytest.approx(
            (loss(logits, target) + 0.4 * loss(aux, target)).item(), rel=1e-6)
