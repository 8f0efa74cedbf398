"""Each architecture against its table in the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet34

from segvoc.errors import WeightsError
from segvoc.models import FCNBaseline, FCNDilated, ResNet34Transfer, SMPModel, UNet

ODD = (97, 131)


def convs(module: nn.Module, kind: type) -> list:
    return [m for m in module.modules() if type(m) is kind]


def spec(layers: list) -> list[tuple]:
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation) for m in layers]


def test_fcn_baseline_layers():
    m = FCNBaseline()
    enc = spec(convs(m.encoder, nn.Conv2d))
    assert enc == [(i, o, (3, 3), (2, 2), (1, 1), (1, 1)) for i, o in [(3, 32), (32, 64), (64, 128), (128, 256),
                                                                          (256, 512)]]
    dec = convs(m.decoder, nn.ConvTranspose2d)
    assert [(d.in_channels, d.out_channels) for d in dec] == [(512, 512), (512, 256), (256, 128), (128, 64), (64, 32)]
    assert all(d.kernel_size == (3, 3) and d.stride == (2, 2) and d.padding == (1, 1) and d.output_padding == (1, 1)
               for d in dec)
    # report 3.1 order inside every block: conv -> ReLU -> BatchNorm
    for block in [*m.encoder, *m.decoder]:
        assert [type(x) for x in block][1:] == [nn.ReLU, nn.BatchNorm2d]
    assert (m.classifier.in_channels, m.classifier.out_channels, m.classifier.kernel_size) == (32, 21, (1, 1))


def test_fcn_dilated_matches_table1():
    m = FCNDilated()
    table1 = [(3, 32, 2, 1, 1), (32, 64, 2, 1, 1), (64, 128, 2, 1, 1), (128, 256, 2, 1, 1), (256, 512, 2, 1, 1),
              (512, 1024, 1, 1, 1), (1024, 1024, 1, 2, 2), (1024, 1024, 1, 4, 4), (1024, 1024, 1, 6, 6)]
    got = [(c.in_channels, c.out_channels, c.stride[0], c.padding[0], c.dilation[0])
           for c in convs(m, nn.Conv2d) if c.kernel_size == (3, 3)]
    assert got == table1
    dec = convs(m.decoder, nn.ConvTranspose2d)
    assert [(d.in_channels, d.out_channels) for d in dec] == [(1024, 1024), (1024, 512), (512, 256), (256, 128),
                                                              (128, 64)]
    assert all(isinstance(b[1], nn.LeakyReLU) for b in [*m.encoder, m.widen, *m.dilated, *m.decoder])
    assert m.dropout.p == 0.5 and m.classifier.in_channels == 64
    assert m.skips is None and m.context is None  # Table 1 by default


def test_resnet34_transfer_layers():
    m = ResNet34Transfer(weights="none")
    assert not any(isinstance(x, nn.Linear | nn.AdaptiveAvgPool2d) for x in m.encoder.modules())
    dec = convs(m.decoder, nn.ConvTranspose2d)
    assert [(d.in_channels, d.out_channels) for d in dec] == [(512, 512), (512, 256), (256, 128), (128, 64), (64, 32)]
    assert (m.classifier.in_channels, m.classifier.out_channels) == (32, 21)


def test_unet_layers():
    m = UNet()
    firsts = [blk[0] for blk in m.down]
    assert [(c.in_channels, c.out_channels) for c in firsts] == [(3, 64), (64, 128), (128, 256), (256, 512),
                                                                 (512, 1024)]
    assert [(u.in_channels, u.out_channels, u.kernel_size, u.stride) for u in m.up] == [
        (1024, 512, (2, 2), (2, 2)), (512, 256, (2, 2), (2, 2)), (256, 128, (2, 2), (2, 2)), (128, 64, (2, 2), (2, 2))]
    assert [blk[0].in_channels for blk in m.up_conv] == [1024, 512, 256, 128]  # concat doubles channels
    assert (m.classifier.in_channels, m.classifier.out_channels) == (64, 21)


@pytest.mark.parametrize("factory", [FCNBaseline, FCNDilated, lambda: ResNet34Transfer(weights="none"), UNet,
                                     lambda: FCNDilated(skip_connections=True, global_context=True),
                                     lambda: SMPModel("Unet", "resnet34", "none"),
                                     lambda: SMPModel("DeepLabV3Plus", "resnet34", "none")])
def test_output_size_equals_input_for_odd_sizes(factory):
    m = factory().eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, *ODD))
    assert y.shape == (1, 21, *ODD)


def test_xavier_init_applied():
    m = FCNBaseline()
    w = m.encoder[1][0].weight  # 32 -> 64, 3x3
    bound = (6 / (32 * 9 + 64 * 9)) ** 0.5
    assert w.abs().max() <= bound + 1e-6 and w.abs().max() > 0.8 * bound
    assert torch.all(m.encoder[1][0].bias == 0)


def _state_file(tmp_path: Path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = resnet34().state_dict()
    path = tmp_path / "r34.pth"
    torch.save(state, path)
    return path, state


def test_weights_from_path_are_loaded_and_not_reinitialised(tmp_path):
    path, state = _state_file(tmp_path)
    m = ResNet34Transfer(weights=str(path))
    assert torch.equal(m.encoder[0].weight, state["conv1.weight"])
    assert torch.equal(m.encoder[7][2].conv2.weight, state["layer4.2.conv2.weight"])


def test_frozen_encoder_gets_no_gradient_and_keeps_bn_stats(tmp_path):
    path, _ = _state_file(tmp_path)
    m = ResNet34Transfer(weights=str(path), freeze_encoder=True).train()
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    feats = m.encode(x)
    assert feats.grad_fn is None  # no autograd graph through the frozen encoder
    loss = m(x).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.encoder.state_dict().items())
    assert not m.encoder.training and m.decoder.training
    assert any(p.grad is not None for p in m.decoder.parameters())


def test_unfrozen_encoder_trains(tmp_path):
    m = ResNet34Transfer(weights="none", freeze_encoder=False).train()
    m(torch.randn(2, 3, 64, 64)).mean().backward()
    assert m.encoder[0].weight.grad is not None and m.encoder.training


def test_bad_weights_give_one_line_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        ResNet34Transfer(weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="not a resnet34 state dict"):
        ResNet34Transfer(weights=str(bad))


def test_imagenet_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; no network here

    calls = []

    def offline(url, *a, **k):
        calls.append(url)
        raise OSError("network unreachable")

    # torchvision's weight enums call the name they imported into torchvision.models._api, not torch.hub's
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        ResNet34Transfer(weights="imagenet")
    assert "model.weights=" in str(err.value) and "\n" not in str(err.value) and "OSError" in str(err.value)
    assert calls and calls[0].endswith("resnet34-b627a593.pth")  # the real download path was taken


def test_cached_features_train_the_decoder_without_re_encoding():
    from segvoc.engine.feature_cache import FeatureCache

    torch.manual_seed(0)
    model = ResNet34Transfer(weights="none").train()
    cache = FeatureCache(model)
    calls = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    images = torch.randn(2, 3, 64, 64)
    cached = cache.logits(images, ["a", "b"])
    again = cache.logits(images, ["a", "b"])
    assert calls == [2]  # encoded once, reused on the second step
    direct = model(images)
    assert torch.allclose(cached, direct, atol=1e-5) and torch.allclose(again, direct, atol=1e-5)
    calls.clear()
    cache.logits(images, ["a", "c"])
    assert calls == [1]  # only the new image is encoded


# modules whose CUDA backward raises under torch.use_deterministic_algorithms (PyTorch's documented list)
NO_DETERMINISTIC_BACKWARD = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AvgPool3d,
                             nn.FractionalMaxPool2d, nn.MaxUnpool2d, nn.ReflectionPad2d, nn.Upsample)


@pytest.mark.parametrize("model", ["fcn_baseline", "fcn_dilated", "fcn_dilated model.global_context=true",
                                   "fcn_dilated model.skip_connections=true", "resnet34_transfer", "unet"])
def test_report_models_have_no_module_that_raises_under_gpu_exact(model):
    """The report models train with trainer=gpu_exact: no module PyTorch lists as without a deterministic CUDA
    backward (5a's global context pools with a mean, the same values as AdaptiveAvgPool2d(1))."""
    from segvoc.config import compose
    from segvoc.engine.builders import build_model
    from segvoc.models.base import GlobalAvgPool

    name, *options = model.split()
    net = build_model(compose([f"model={name}", *options]).model, 21, pretrained=False)
    trained = [m for name, m in net.named_modules() if not name.startswith("encoder")] \
        if getattr(net, "freeze_encoder", False) else list(net.modules())
    assert not [type(m).__name__ for m in trained if isinstance(m, NO_DETERMINISTIC_BACKWARD)]
    x = torch.randn(2, 7, 5, 9)
    assert torch.allclose(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x), atol=1e-6)


def test_cached_features_need_a_frozen_encoder():
    from segvoc.engine.feature_cache import FeatureCache
    from segvoc.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a frozen encoder"):
        FeatureCache(ResNet34Transfer(weights="none", freeze_encoder=False))


def test_cached_features_refuse_random_augmentation(smoke_cfg):
    from segvoc.errors import ConfigError
    from segvoc.train import train

    cfg = smoke_cfg("model=resnet34_transfer", "model.weights=none", "model.cache_features=true", "augment=report")
    with pytest.raises(ConfigError, match="augment=report is random"):
        train(cfg)


MIXED_SIZES = [[61, 77], [77, 61], [45, 90]]  # augment=none pads them to 64x96 and 96x64 (data.image_size=64)


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic tree of odd, mixed image sizes (as the other data tests use)."""
    from segvoc.data.synthetic import generate

    root = tmp_path_factory.mktemp("mixed") / "synthetic"
    generate(root, num_train=8, num_val=4, sizes=MIXED_SIZES, seed=1)
    return root


def test_cached_features_do_not_depend_on_batch_mates(tmp_path, mixed_root):
    """Real VOC sizes: each id is encoded alone at its own padded size, so two shuffled epochs (workers on) reuse
    features that equal the id's own encoding, and the cached logits equal the uncached path's for a batch."""
    from segvoc.config import compose
    from segvoc.engine.builders import build_datamodule, build_task

    cfg = compose([f"paths.output_dir={tmp_path}", "data=synthetic", f"data.root={mixed_root}", "data.synthetic=null",
                   "model=resnet34_transfer", "model.weights=none", "model.cache_features=true", "augment=none",
                   "data.image_size=64", "data.batch_size=3", "data.num_workers=2"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    torch.manual_seed(0)
    task = build_task(cfg, pretrained=False).eval()
    cache, model = task.feature_cache, task.model
    calls: list[int] = []
    model.encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    loader = dm.train_dataloader()
    mixed = same_size_checks = uncached = 0
    orders = []
    with torch.no_grad():
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches = list(loader)
            orders.append([i for b in batches for i in b["id"]])
            for batch in batches:
                logits = cache.logits(task.normalize(batch["image"]), batch["id"], batch["size"])
                assert logits.shape[-2:] == batch["mask"].shape[-2:]
                sizes = [tuple(s) for s in batch["size"].tolist()]
                mixed += len(set(sizes)) > 1
                for h, w in set(sizes):  # the images of one size, as a batch of their own: cached == uncached
                    ks = [k for k, s in enumerate(sizes) if s == (h, w)]
                    images = batch["image"][ks, :, :h, :w]
                    cached = cache.logits(task.normalize(images), [batch["id"][k] for k in ks])
                    assert torch.allclose(cached, task(images), atol=1e-5)
                    same_size_checks += 1
                    uncached += len(ks)
    assert mixed >= 1 and same_size_checks >= 3  # batches of mixed sizes were met
    assert orders[0] != orders[1]  # shuffled: an id met other batch mates in epoch 2
    assert sum(calls) - uncached == len(cache.features) == len(dm.datasets["train"])  # each id encoded once
    assert all(f.device.type == "cpu" for f in cache.features.values())
    with torch.no_grad():
        for k in range(len(dm.datasets["train"])):
            sample = dm.datasets["train"][k]
            alone = model.encode(task.normalize(sample["image"][None]))[0]
            assert torch.allclose(cache.features[sample["id"]], alone, atol=1e-5), sample["id"]
    assert cache.nbytes() == sum(f.numel() * 4 for f in cache.features.values())


def test_cached_features_smoke_run_on_mixed_sizes(tmp_path, mixed_root, monkeypatch):
    """0.3 crashed in epoch 2 (``stack expects each tensor to be equal size``) on mixed sizes with workers. Every
    training step of the 3 epochs goes through the cache, and each training image is encoded once, however many
    epochs see it."""
    from segvoc.engine.feature_cache import FeatureCache
    from segvoc.train import train
    from tests.conftest import make_cfg

    steps, encoded = [], []
    logits = FeatureCache.logits

    def spy(self, images, ids, sizes=None):
        encoded.extend(i for i in ids if i not in self.features)
        steps.append(list(ids))
        return logits(self, images, ids, sizes)

    monkeypatch.setattr(FeatureCache, "logits", spy)
    cfg = make_cfg(tmp_path, "data=synthetic", "debug=smoke", "data.image_size=64", "data.synthetic=null",
                   "model=resnet34_transfer", "model.weights=none", "model.cache_features=true", "augment=none",
                   "data.batch_size=3", "data.num_workers=2", "trainer.max_epochs=3", data_root=mixed_root)
    metrics = train(cfg)
    assert len(steps) == 3 * 2  # 8 training images, batches of 3, the last partial one dropped: 2 steps an epoch
    assert len(encoded) == len(set(encoded)) == len({i for ids in steps for i in ids}) > 3
    assert 0 <= metrics["test"]["miou"] <= 1


def test_perf_compile_leaves_the_cached_decoder_eager(smoke_cfg):
    """Pinned behaviour (README, Performance): ``perf.compile`` compiles the model's forward, which the cached
    path never calls; the cached decoder runs eagerly (5b's compile gain was x1.01)."""
    from torch._dynamo.utils import counters

    from segvoc.engine.builders import build_task

    cfg = smoke_cfg("model=resnet34_transfer", "model.weights=none", "model.cache_features=true", "augment=none",
                    "perf.compile=true")
    task = build_task(cfg, pretrained=False)
    assert task.model._compiled_call_impl is not None  # compile did apply to the model's forward
    frames = counters["stats"]["unique_graphs"]
    task.feature_cache.logits(torch.randn(2, 3, 64, 64), ["a", "b"])
    assert counters["stats"]["unique_graphs"] == frames  # nothing compiled on the cached path


def test_reference_models_train_the_aux_head_at_ten_times_the_lr(smoke_cfg):
    """torchvision's reference recipe: the auxiliary FCN head gets 10x the learning rate of the rest."""
    from segvoc.engine.builders import build_task

    cfg = smoke_cfg("experiment=ref_fcn_resnet50", "model.weights=none", "scheduler=none")
    task = build_task(cfg)
    optimizer = task.configure_optimizers()["optimizer"]
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [cfg.optimizer.lr, 10 * cfg.optimizer.lr]
    aux = {id(p) for p in task.model.net.aux_classifier.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == aux
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(task.model.parameters()))


@pytest.mark.slow
def test_smp_pretrained_encoder_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the unreachable hub
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        SMPModel("Unet", "resnet34", "imagenet")
    msg = str(err.value)
    assert "smp encoder resnet34" in msg and "model.encoder_weights=none" in msg and "\n" not in msg


def test_smp_unknown_architecture_names_the_keys():
    from segvoc.errors import ConfigError

    with pytest.raises(ConfigError, match="model.arch=Unett model.encoder=resnet34: not an smp model"):
        SMPModel("Unett", "resnet34", "none")
