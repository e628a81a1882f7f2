"""Model shapes, input-channel initialisation and the three checkpoint formats."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchvision.models import DenseNet

from src.data.classes import CLASS_INDEX, CLASS_NAMES
from src.train.models import (ARCHS, PREVIOUS_COMPETITION_CLASSES, CheckpointError, DenseNetClassifier,
                              adapt_input_conv, build_model, load_model_checkpoint, load_weights)
from src.train.trainer import TrainerConfig, save_model_checkpoint


def _old_torchvision_names(state: dict) -> dict:
    """'...denselayer1.norm1.weight' -> '...denselayer1.norm.1.weight' (the pre-0.3 torchvision naming)."""
    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
            for key, value in state.items()}


def test_forward_shapes_embedding_and_uint8_input() -> None:
    torch.manual_seed(0)
    model = build_model("densenet_tiny", embedding_dim=24).eval()
    images = torch.randint(0, 256, (3, 4, 64, 64), dtype=torch.uint8)
    logits, embedding = model(images, return_embedding=True)
    assert logits.shape == (3, 19) and embedding.shape == (3, 24)
    assert torch.allclose(model.embed(images), embedding)
    assert torch.allclose(model(images.float() / 255.0), logits, atol=1e-5)
    plain = build_model("densenet_tiny", head="plain").eval()
    assert plain(images, return_embedding=True)[1].shape == (3, plain.num_features)


def test_densenet121_head_widths() -> None:
    model = build_model("densenet121")
    assert isinstance(model.backbone, DenseNet)
    assert model.num_features == 1024 and model.embedding_dim == 1024
    assert model.fc1.in_features == 2048 and model.fc1.out_features == 1024 and model.logit.in_features == 1024
    assert model.backbone.features.conv0.in_channels == 4


def test_adapt_input_conv() -> None:
    weight = torch.randn(8, 3, 7, 7)
    four = adapt_input_conv(weight, 4)
    assert torch.equal(four[:, :3], weight) and torch.equal(four[:, 3], weight[:, 0])
    six = adapt_input_conv(weight, 6)
    assert torch.allclose(six[:, 4], weight.mean(dim=1)) and torch.equal(six[:, 3], weight[:, 0])
    assert torch.equal(adapt_input_conv(four, 5)[:, 4], four.mean(dim=1))
    assert torch.equal(adapt_input_conv(weight, 2), weight[:, :2])


@pytest.mark.parametrize("in_channels", [4, 5])
def test_torchvision_imagenet_state_dict_old_naming(in_channels: int) -> None:
    torch.manual_seed(1)
    imagenet = DenseNet(**ARCHS["densenet_tiny"], num_classes=1000)
    state = _old_torchvision_names(imagenet.state_dict())
    assert any(".norm.1." in key for key in state)
    model = build_model("densenet_tiny", in_channels=in_channels)
    logit_before = model.logit.weight.clone()
    report = load_weights(model, state)
    assert report.source_format == "torchvision ImageNet" and report.input_conv_adapted
    conv0, theirs = model.backbone.features.conv0.weight, imagenet.features.conv0.weight
    assert torch.equal(conv0[:, :3], theirs)
    assert torch.equal(conv0[:, 3], theirs[:, 0])  # the 4th (yellow) filter copies the red one
    if in_channels == 5:
        assert torch.allclose(conv0[:, 4], theirs.mean(dim=1))
    layer = "backbone.features.denseblock2.denselayer1.conv1.weight"
    assert torch.equal(model.state_dict()[layer], imagenet.state_dict()[layer.removeprefix("backbone.")])
    assert torch.equal(model.logit.weight, logit_before)  # the 1000-class classifier is not used
    assert not [key for key in report.missing if key.startswith("backbone.")]
    assert sorted(report.missing) == ["bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.weight", "bn2.bias",
                                      "bn2.running_mean", "bn2.running_var", "bn2.weight", "fc1.bias", "fc1.weight",
                                      "logit.bias", "logit.weight"]


def _previous_competition_checkpoint(arch: str) -> tuple[dict, DenseNetClassifier]:
    """A 28-class model in the previous competition's layout: keys nested under 'state_dict', 'module.'
    prefixes, the Sequential aliases (conv1.*, encoder2.*) of its shared modules, old layer naming."""
    torch.manual_seed(2)
    previous = DenseNetClassifier(arch, in_channels=4, num_classes=len(PREVIOUS_COMPETITION_CLASSES))
    state = dict(previous.state_dict())
    state["conv1.0.weight"] = state["backbone.features.conv0.weight"]
    for key in [k for k in state if k.startswith("backbone.features.denseblock1.")]:
        state["encoder2.0." + key.removeprefix("backbone.features.denseblock1.")] = state[key]
    state = _old_torchvision_names(state)
    return {"epoch": 30, "state_dict": {f"module.{key}": value for key, value in state.items()}}, previous


@pytest.mark.parametrize("arch", ["densenet_tiny", "densenet121"])
def test_previous_competition_checkpoint_class_rows_by_name(arch: str, tmp_path: Path) -> None:
    checkpoint, previous = _previous_competition_checkpoint(arch)
    path = tmp_path / "previous.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(3)
    model = build_model(arch)
    fresh_logit = model.logit.weight.clone()
    report = load_weights(model, path)
    assert report.source_format.startswith("previous-competition")
    assert report.missing == [] and report.unexpected == [] and report.skipped_shape == []
    theirs = previous.logit.weight
    assert torch.equal(model.logit.weight[CLASS_INDEX["Mitotic spindle"]], theirs[17])
    assert torch.equal(model.logit.weight[CLASS_INDEX["Cytosol"]], theirs[25])
    assert torch.equal(model.logit.weight[CLASS_INDEX["Aggresome"]], theirs[24])
    assert torch.equal(model.logit.bias[CLASS_INDEX["Centrosome"]], previous.logit.bias[19])
    # classes new in 2021 are filled as the reference fills them: from 2018 rows 26 and 27
    assert torch.equal(model.logit.weight[CLASS_INDEX["Vesicles and punctate cytosolic patterns"]], theirs[26])
    assert torch.equal(model.logit.bias[CLASS_INDEX["Negative"]], previous.logit.bias[27])
    assert not torch.equal(model.logit.weight[CLASS_INDEX["Negative"]], fresh_logit[CLASS_INDEX["Negative"]])
    assert len(report.class_rows) == len(CLASS_NAMES)
    assert torch.equal(model.fc1.weight, previous.fc1.weight)
    assert torch.equal(model.bn2.running_var, previous.bn2.running_var)
    assert torch.equal(model.backbone.features.conv0.weight, previous.backbone.features.conv0.weight)


def test_own_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = build_model("densenet_tiny", embedding_dim=16, dropout=0.2)
    cfg = TrainerConfig(out_dir=tmp_path, epochs=1, metadata={"model_config": model.config()})
    save_model_checkpoint(tmp_path / "best.pth", model, cfg, {"epoch": 1})
    other = build_model("densenet_tiny", embedding_dim=16, dropout=0.2)
    report = load_weights(other, tmp_path / "best.pth")
    assert report.source_format == "ours" and report.missing == [] and report.unexpected == []
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    rebuilt = load_model_checkpoint(tmp_path / "best.pth")
    assert rebuilt.embedding_dim == 16 and not rebuilt.training
    images = torch.randint(0, 256, (2, 4, 32, 32), dtype=torch.uint8)
    assert torch.allclose(rebuilt(images), model.eval()(images))


def test_plain_head_checkpoint_does_not_fill_dropout_head_logit() -> None:
    plain = DenseNetClassifier("densenet_tiny", head="plain")
    model = build_model("densenet_tiny", embedding_dim=plain.num_features)
    before = model.logit.weight.clone()
    with pytest.raises(CheckpointError, match="does not fit --arch densenet_tiny --head dropout: missing 12"):
        load_weights(model, plain.state_dict())
    assert torch.equal(model.logit.weight, before)
    report = load_weights(model, plain.state_dict(), strict=False)
    assert torch.equal(model.logit.weight, before) and "logit.weight" in report.skipped_shape
