"""The 2018 checkpoint in the reference's exact layout: same logits as the reference's own forward pass."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from src.train.models import ARCHS, CheckpointError, DenseNetClassifier, build_model, load_weights
from src.train.trainer import TrainerConfig, save_model_checkpoint

# 2018 row of each of our 19 classes, worked out by hand from the two class lists: the 17 shared names,
# then the rows the reference appends for Vesicles (26) and Negative (27).
REFERENCE_ROWS = [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 14, 17, 19, 21, 23, 24, 25, 26, 27]
MEAN = (0.074598, 0.050630, 0.050891, 0.076287)
STD = (0.122813, 0.085745, 0.129882, 0.119411)


class ReferenceLargeDropout(nn.Module):
    """bestfitting's class_densenet121_large_dropout written out plainly (any DenseNet shape): a torchvision
    DenseNet backbone (ImageNet classifier kept) with a 4-channel conv0, the stem and blocks re-grouped
    as conv1 / encoder2..5 Sequentials that share the backbone's modules (so the state dict holds both
    names), a MaxPool2d(2) after the stem, and the dropout head."""

    def __init__(self, shape: dict, num_classes: int = 28):
        super().__init__()
        self.backbone = DenseNet(**shape)
        features = self.backbone.features
        rgb = features.conv0.weight
        features.conv0 = nn.Conv2d(4, rgb.shape[0], kernel_size=7, stride=2, padding=3, bias=False)
        features.conv0.weight = nn.Parameter(torch.cat([rgb, rgb[:, :1]], dim=1))
        self.conv1 = nn.Sequential(features.conv0, features.norm0, features.relu0, features.pool0)
        self.encoder2 = nn.Sequential(features.denseblock1)
        self.encoder3 = nn.Sequential(features.transition1, features.denseblock2)
        self.encoder4 = nn.Sequential(features.transition2, features.denseblock3)
        self.encoder5 = nn.Sequential(features.transition3, features.denseblock4, features.norm5)
        self.maxpool = nn.MaxPool2d(2, stride=2)
        width = self.backbone.classifier.in_features
        self.logit = nn.Linear(width, num_classes)
        self.bn1 = nn.BatchNorm1d(2 * width)
        self.fc1 = nn.Linear(2 * width, width)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for channel in range(4):
            x[:, channel] = (x[:, channel] - MEAN[channel]) / STD[channel]
        x = self.maxpool(self.conv1(x))
        x = F.relu(self.encoder5(self.encoder4(self.encoder3(self.encoder2(x)))))
        x = torch.cat([nn.AdaptiveAvgPool2d(1)(x), nn.AdaptiveMaxPool2d(1)(x)], dim=1).flatten(1)
        x = F.dropout(self.bn1(x), p=0.5, training=self.training)
        x = F.relu(self.fc1(x))
        x = F.dropout(self.bn2(x), p=0.5, training=self.training)
        return self.logit(x)


@pytest.fixture
def tiny_large(monkeypatch) -> str:
    """A small DenseNet shape with the large variant's extra pool, for speed."""
    monkeypatch.setitem(ARCHS, "tiny_large", {**ARCHS["densenet_tiny"], "large": True})
    return "tiny_large"


def _reference_checkpoint(path: Path) -> ReferenceLargeDropout:
    torch.manual_seed(7)
    reference = ReferenceLargeDropout(ARCHS["densenet_tiny"])
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode depends on every buffer
        for module in reference.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    state = reference.state_dict()
    for key in ("backbone.features.conv0.weight", "conv1.0.weight", "encoder5.2.running_var",
                "backbone.classifier.weight", "encoder2.0.denselayer1.conv1.weight"):
        assert key in state  # the reference's layout, aliases and unused ImageNet classifier included
    assert state["logit.weight"].shape[0] == 28
    torch.save({"save_dir": "models/fold0", "state_dict": state, "best_epoch": 30, "epoch": 30,
                "best_score": torch.tensor(0.1)}, path)
    return reference.eval()


def test_reference_layout_gives_the_reference_logits(tiny_large: str, tmp_path: Path) -> None:
    reference = _reference_checkpoint(tmp_path / "final.pth")
    model = build_model(tiny_large)
    report = load_weights(model, tmp_path / "final.pth")  # strict
    assert report.source_format.startswith("previous-competition")
    model.eval()
    images = torch.rand(3, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images)[:, REFERENCE_ROWS]
        ours = model(images)
        assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
        # the same weights without the stem pool (what --arch densenet121 would build) are another network
        plain = build_model("densenet_tiny")
        load_weights(plain, tmp_path / "final.pth")
        assert (plain.eval()(images) - expected).abs().max() > 1e-2


def test_densenet121_large_pools_after_the_stem() -> None:
    large, plain = build_model("densenet121_large"), build_model("densenet121")
    names = [name for name, _ in large.backbone.features.named_children()]
    assert names[:6] == ["conv0", "norm0", "relu0", "pool0", "large_pool", "denseblock1"]
    assert large.state_dict().keys() == plain.state_dict().keys()
    images = torch.rand(1, 4, 128, 128)
    with torch.no_grad():
        assert large.eval().backbone.features(images).shape[-2:] == (2, 2)  # 128 / 64
        assert plain.eval().backbone.features(images).shape[-2:] == (4, 4)  # 128 / 32
    assert large.config()["arch"] == "densenet121_large"


def test_misfit_checkpoint_stops_with_one_line_unless_non_strict(tiny_large: str, tmp_path: Path) -> None:
    _reference_checkpoint(tmp_path / "final.pth")
    checkpoint = torch.load(tmp_path / "final.pth", weights_only=True)
    state = checkpoint["state_dict"]
    del state["fc1.weight"]
    state["extra.weight"] = torch.zeros(1)
    model = build_model(tiny_large)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_weights(model, checkpoint)
    message = str(error.value)
    assert "\n" not in message and "missing 1: fc1.weight" in message and "unexpected 1: extra.weight" in message
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # nothing loaded
    report = load_weights(model, checkpoint, strict=False)
    assert report.missing == ["fc1.weight"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.fc1.weight, before["fc1.weight"])
    assert not torch.equal(model.fc1.bias, before["fc1.bias"])


def test_our_checkpoint_of_the_other_variant_is_refused(tiny_large: str, tmp_path: Path) -> None:
    large = build_model(tiny_large)
    save_model_checkpoint(tmp_path / "best.pth", large,
                          TrainerConfig(out_dir=tmp_path, epochs=1, metadata={"model_config": large.config()}), {})
    with pytest.raises(CheckpointError, match="saved from --arch tiny_large"):
        load_weights(build_model("densenet_tiny"), tmp_path / "best.pth")
    assert load_weights(build_model(tiny_large), tmp_path / "best.pth").loaded > 0
    assert isinstance(large, DenseNetClassifier) and large.large
