"""Image classifier: a torchvision `DenseNet` with N input channels and bestfitting's head.

    x (uint8 0..255 or float 0..1, N channels) -> per-channel normalisation (inside the model)
      -> DenseNet features -> ReLU -> concat(global avg pool, global max pool)      (2F)
      -> bn1 -> dropout -> fc1 (2F -> E) = the embedding -> ReLU -> bn2 -> dropout -> logit (E -> 19)

F is the backbone's feature width (1024 for densenet121) and E the embedding width (F by default,
so 1024 for densenet121 as in the reference). The embedding used for pseudo-labelling is the fc1
output, as the reference took it. `head="plain"` is the variant without the hidden layer
(avg pool -> logit; the embedding is then the pooled features).

`densenet121_large` is bestfitting's `class_densenet121_large_dropout`, the network of the 2018
competition checkpoint (trained at 1536 px): a MaxPool2d(2) after the stem's pool0 halves every feature
map (a 1024-px input ends at 16x16), the rest as densenet121. The pool has no weights, so the state dict
is the same; the variant is part of `config()`/`arch` and of our checkpoints.

Parameter names follow the previous-competition model (`backbone.features.*`, `bn1`, `fc1`, `bn2`,
`logit`) so its checkpoint maps almost one to one; see `load_weights` for the accepted formats.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from src.data.classes import CLASS_NAMES, NUM_CLASSES
from src.utils.io import UserInputError

log = logging.getLogger(__name__)

# growth_rate, block_config, num_init_features, bn_size; large: the extra MaxPool2d(2) after pool0
ARCHS: dict[str, dict[str, Any]] = {
    "densenet121_large": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                              large=True),
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4),
    "densenet_small": dict(growth_rate=16, block_config=(2, 4, 8, 6), num_init_features=32, bn_size=4),
    "densenet_tiny": dict(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2),
}
# The reference's architecture names (its --arch values) for ours.
ARCH_ALIASES = {"class_densenet121_large_dropout": "densenet121_large", "class_densenet121_dropout": "densenet121"}
# Channel statistics of 8-bit HPA images scaled to [0, 1] (RGBY), as used by the previous-competition model.
HPA_MEAN = (0.074598, 0.050630, 0.050891, 0.076287)
HPA_STD = (0.122813, 0.085745, 0.129882, 0.119411)

# Classes of the 2018 HPA competition, in the row order of that model's classifier.
PREVIOUS_COMPETITION_CLASSES: tuple[str, ...] = (
    "Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nucleoli fibrillar center", "Nuclear speckles",
    "Nuclear bodies", "Endoplasmic reticulum", "Golgi apparatus", "Peroxisomes", "Endosomes", "Lysosomes",
    "Intermediate filaments", "Actin filaments", "Focal adhesion sites", "Microtubules", "Microtubule ends",
    "Cytokinetic bridge", "Mitotic spindle", "Microtubule organizing center", "Centrosome", "Lipid droplets",
    "Plasma membrane", "Cell junctions", "Mitochondria", "Aggresome", "Cytosol", "Cytoplasmic bodies",
    "Rods & rings",
)
# Our classes absent from 2018 and the 2018 row the reference copies into each anyway (its rows 26 and 27,
# appended after the 17 rows matched by name).
PREVIOUS_COMPETITION_FILL_ROWS: dict[str, str] = {
    "Vesicles and punctate cytosolic patterns": "Cytoplasmic bodies", "Negative": "Rods & rings"}


class CheckpointError(UserInputError):
    """A checkpoint file that cannot be read, or that does not fit the model (one line for the CLI)."""


def arch_name(text: str) -> str:
    """argparse type for --arch: one of ARCHS or a reference name from ARCH_ALIASES."""
    name = ARCH_ALIASES.get(text, text)
    if name not in ARCHS:
        raise ValueError(text)
    return name


def is_large(arch: str) -> bool:
    return bool(ARCHS[arch].get("large", False))


def _channel_stats(values: tuple[float, ...], in_channels: int) -> list[float]:
    if in_channels <= len(values):
        return list(values[:in_channels])
    extra = sum(values) / len(values)
    return list(values) + [extra] * (in_channels - len(values))


class DenseNetClassifier(nn.Module):
    """DenseNet backbone + bestfitting head; `forward(x, return_embedding=True)` also returns the embedding."""

    def __init__(self, arch: str = "densenet121", in_channels: int = 4, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.5, embedding_dim: int | None = None, head: str = "dropout",
                 memory_efficient: bool = False, mean: tuple[float, ...] = HPA_MEAN,
                 std: tuple[float, ...] = HPA_STD):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        if head not in ("dropout", "plain"):
            raise ValueError(f"head must be 'dropout' or 'plain', got {head!r}")
        self.arch, self.in_channels, self.head_kind, self.dropout = arch, in_channels, head, dropout
        self.large = is_large(arch)
        shape = {key: value for key, value in ARCHS[arch].items() if key != "large"}
        self.backbone = DenseNet(**shape, memory_efficient=memory_efficient)
        self.num_features = self.backbone.classifier.in_features
        self.backbone.classifier = nn.Identity()  # unused: the head below replaces it
        if in_channels != 3:
            old = self.backbone.features.conv0
            self.backbone.features.conv0 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                                     stride=old.stride, padding=old.padding, bias=False)
            with torch.no_grad():
                self.backbone.features.conv0.weight.copy_(adapt_input_conv(old.weight, in_channels))
        if self.large:
            layers = list(self.backbone.features.named_children())
            after_stem = [name for name, _ in layers].index("pool0") + 1
            layers.insert(after_stem, ("large_pool", nn.MaxPool2d(2, stride=2)))
            self.backbone.features = nn.Sequential(OrderedDict(layers))
        self.register_buffer("input_mean", torch.tensor(_channel_stats(mean, in_channels)).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(_channel_stats(std, in_channels)).view(1, -1, 1, 1),
                             persistent=False)
        if head == "dropout":
            self.embedding_dim = embedding_dim or self.num_features
            self.bn1 = nn.BatchNorm1d(2 * self.num_features)
            self.fc1 = nn.Linear(2 * self.num_features, self.embedding_dim)
            self.bn2 = nn.BatchNorm1d(self.embedding_dim)
        else:
            self.embedding_dim = self.num_features
        self.logit = nn.Linear(self.embedding_dim, num_classes)
        nn.init.zeros_(self.logit.bias)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 input is scaled to [0, 1]; then per-channel (x - mean) / std."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return (x - self.input_mean) / self.input_std

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = F.relu(self.backbone.features(self.normalise(x)))
        if self.head_kind == "plain":
            return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)
        return torch.cat([torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1),
                          torch.flatten(F.adaptive_max_pool2d(maps, 1), 1)], dim=1)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        pooled = self.pooled_features(x)
        if self.head_kind == "plain":
            embedding, hidden = pooled, pooled
        else:
            embedding = self.fc1(F.dropout(self.bn1(pooled), self.dropout, self.training))
            hidden = F.dropout(self.bn2(F.relu(embedding)), self.dropout, self.training)
        logits = self.logit(hidden)
        return (logits, embedding) if return_embedding else logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (fc1 output, `embedding_dim` wide)."""
        return self.forward(x, return_embedding=True)[1]

    def config(self) -> dict[str, Any]:
        return dict(arch=self.arch, in_channels=self.in_channels, num_classes=self.logit.out_features,
                    dropout=self.dropout, embedding_dim=self.embedding_dim, head=self.head_kind)


def build_model(arch: str = "densenet121", in_channels: int = 4, num_classes: int = NUM_CLASSES,
                dropout: float = 0.5, embedding_dim: int | None = None, head: str = "dropout",
                memory_efficient: bool = False) -> DenseNetClassifier:
    return DenseNetClassifier(arch=arch, in_channels=in_channels, num_classes=num_classes, dropout=dropout,
                              embedding_dim=embedding_dim, head=head, memory_efficient=memory_efficient)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-conv kernel (out, c, k, k) -> (out, in_channels, k, k).

    Existing input filters are kept; from 3 to 4 channels the 4th (yellow) copies the red filter;
    any other added filter is the mean kernel over the existing ones. Fewer channels keep the first ones.
    """
    have = weight.shape[1]
    if in_channels <= have:
        return weight[:, :in_channels].clone()
    extra = []
    for channel in range(have, in_channels):
        extra.append(weight[:, :1] if (have == 3 and channel == 3) else weight.mean(dim=1, keepdim=True))
    return torch.cat([weight] + extra, dim=1)


# --------------------------------------------------------------------------------------------------
# Loading weights from local files
# --------------------------------------------------------------------------------------------------
_OLD_DENSELAYER_KEY = re.compile(  # torchvision's old 'denselayer1.norm.1.weight' naming
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_ALIAS_PREFIXES = ("conv1.", "encoder2.", "encoder3.", "encoder4.", "encoder5.")  # previous model's shared modules
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net", "weights")


@dataclass
class LoadReport:
    """What `load_weights` did; `loaded` counts tensors copied into the model."""

    source_format: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    class_rows: dict[str, int] = field(default_factory=dict)  # our class name -> their row
    input_conv_adapted: bool = False


def read_checkpoint(path: str | Path) -> Any:
    """torch.load on CPU with weights_only; a file that is not a readable PyTorch checkpoint (text, truncated,
    corrupted) raises CheckpointError. Only a well-formed file that needs pickled classes beyond tensors (old
    checkpoints with numpy scalars) is retried as a full pickle, with a warning (local files only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("Weights only load failed"):
            raise _unreadable(path, error) from None
        log.warning("%s: holds more than tensors; loading it as a full pickle", path)
    except Exception as error:  # noqa: BLE001 - torch reports damage as RuntimeError, EOFError, KeyError...
        raise _unreadable(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    reason = (str(error).strip().splitlines() or [""])[0][:120]
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or damaged "
                           f"({type(error).__name__}{': ' + reason if reason else ''})")


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Unwrap {'model'|'state_dict'|...: {...}} nesting and strip 'module.'/'_orig_mod.' prefixes."""
    obj = checkpoint
    while isinstance(obj, Mapping):  # a wrapper may hold loose tensors too (the 2018 file's best_score)
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            if not any(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"no state dict found in checkpoint (keys: {list(obj)[:10]})")
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        match = _OLD_DENSELAYER_KEY.match(key)
        state[match.group(1) + match.group(2) if match else key] = value
    return state


def _to_our_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename torchvision (`features.*`, `classifier.*`) and previous-model keys to ours; name the format."""
    has_backbone = any(key.startswith("backbone.features.") for key in state)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("features."):
            key = "backbone." + key
        elif key.startswith("classifier."):
            key = "logit." + key.split(".", 1)[1]
        elif has_backbone and key.startswith(_ALIAS_PREFIXES):
            continue  # duplicates of backbone.features.* in the previous-competition model
        elif key.startswith("backbone.classifier."):
            continue  # the previous model kept torchvision's unused ImageNet classifier inside its backbone
        renamed[key] = value
    rows = renamed["logit.weight"].shape[0] if "logit.weight" in renamed else None
    if rows == len(PREVIOUS_COMPETITION_CLASSES):
        kind = "previous-competition (28 classes)"
    elif rows == 1000:
        kind = "torchvision ImageNet"  # its 1000-class classifier is of no use here
        renamed = {key: value for key, value in renamed.items() if not key.startswith("logit.")}
    else:
        kind = "ours" if rows == NUM_CLASSES else f"unknown ({rows} classifier rows)"
    return renamed, kind


def load_weights(model: DenseNetClassifier, source: str | Path | Mapping[str, Any], strict: bool = True) -> LoadReport:
    """Initialise `model` from a local checkpoint file or an in-memory checkpoint/state dict.

    Accepted: (a) the previous-competition DenseNet121 (28-row classifier; rows copied to our classes as the
    reference maps them, see `_map_class_rows`); (b) a torchvision ImageNet DenseNet state dict (old
    'norm.1' key naming included; its 1000-class classifier is ignored, the head stays fresh); (c) our own
    checkpoints. Any of them possibly nested under 'state_dict'/'model' and prefixed by 'module.'. The
    first conv is adapted to the model's input channels (`adapt_input_conv`).

    strict (default): a checkpoint that does not fit the model (missing, unexpected or wrongly shaped
    tensors; one of our checkpoints of another architecture) raises CheckpointError naming the keys, and
    nothing is loaded. Not strict: what fits is loaded and the rest logged.
    """
    name = str(source) if isinstance(source, (str, Path)) else "checkpoint"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state, kind = _to_our_names(extract_state_dict(checkpoint))
    report = LoadReport(source_format=kind)
    own = model.state_dict()
    has_hidden = any(key.startswith(("bn1.", "fc1.", "bn2.")) for key in state)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if key.startswith("logit."):
            if has_hidden != ("fc1.weight" in own):
                report.skipped_shape.append(key)  # a head of the other variant: same width, other meaning
                continue
            if value.shape[0] == len(PREVIOUS_COMPETITION_CLASSES) and target.shape[0] == NUM_CLASSES \
                    and value.shape[1:] == target.shape[1:]:
                value = _map_class_rows(value, report)
        elif key == "backbone.features.conv0.weight" and value.shape[1] != target.shape[1] \
                and value.shape[0] == target.shape[0]:
            value = adapt_input_conv(value, target.shape[1])
            report.input_conv_adapted = True
        if value.shape != target.shape:
            report.skipped_shape.append(key)
            continue
        mapped[key] = value.to(target.dtype)
    head_is_fresh = kind == "torchvision ImageNet"  # a backbone-only checkpoint: the head is new by design
    report.missing = [key for key in own if key not in mapped and not key.endswith("num_batches_tracked")]
    saved_arch = (checkpoint.get("model_config") or {}).get("arch") if isinstance(checkpoint, Mapping) else None
    other_variant = saved_arch in ARCHS and is_large(saved_arch) != model.large
    misfits = [key for key in report.missing if not (head_is_fresh and not key.startswith("backbone."))]
    if strict and (misfits or report.unexpected or report.skipped_shape or other_variant):
        raise CheckpointError(_misfit_line(name, model, kind, misfits, report, saved_arch if other_variant else None))
    model.load_state_dict(mapped, strict=False)
    report.loaded = len(mapped)
    log.info("loaded %d tensors (checkpoint format: %s) into %s; input conv adapted: %s; class rows mapped: %d",
             report.loaded, kind, model.arch, report.input_conv_adapted, len(report.class_rows))
    if kind.startswith("previous-competition") and not model.large:
        log.warning("the 2018 checkpoint of the reference belongs to densenet121_large (MaxPool after the stem); "
                    "--arch %s fits only bestfitting's class_densenet121_dropout weights", model.arch)
    if report.missing:
        log.warning("%d model tensors not in the checkpoint (kept as initialised): %s",
                    len(report.missing), _abbreviate(report.missing))
    if report.unexpected:
        log.warning("%d checkpoint tensors not used: %s", len(report.unexpected), _abbreviate(report.unexpected))
    if report.skipped_shape:
        log.warning("skipped for shape/head mismatch: %s", _abbreviate(report.skipped_shape))
    return report


def _misfit_line(name: str, model: DenseNetClassifier, kind: str, missing: list[str], report: LoadReport,
                 saved_arch: str | None) -> str:
    parts = [f"missing {len(missing)}: {_abbreviate(missing, 4)}" if missing else "",
             f"unexpected {len(report.unexpected)}: {_abbreviate(report.unexpected, 4)}" if report.unexpected else "",
             f"wrong shape or head: {_abbreviate(report.skipped_shape, 4)}" if report.skipped_shape else "",
             f"saved from --arch {saved_arch}" if saved_arch else ""]
    return (f"{name} ({kind}) does not fit --arch {model.arch} --head {model.head_kind}: "
            + "; ".join(part for part in parts if part) + " (--non-strict loads what fits)")


def _map_class_rows(theirs: torch.Tensor, report: LoadReport) -> torch.Tensor:
    """Our 19 rows from the 28 of the 2018 layer, as the reference maps them: the 17 classes present in
    both by name, then Vesicles and Negative from the 2018 rows of PREVIOUS_COMPETITION_FILL_ROWS."""
    rows = []
    for name in CLASS_NAMES:
        their_name = name if name in PREVIOUS_COMPETITION_CLASSES else PREVIOUS_COMPETITION_FILL_ROWS[name]
        rows.append(PREVIOUS_COMPETITION_CLASSES.index(their_name))
        report.class_rows[name] = rows[-1]
    return theirs[rows].clone()


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")


def load_model_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> DenseNetClassifier:
    """Rebuild a model from one of our checkpoints (best.pth / final.pth / last.pth) for inference."""
    checkpoint = read_checkpoint(path)
    config = dict(checkpoint.get("model_config") or {}) if isinstance(checkpoint, Mapping) else {}
    if not config or not isinstance(checkpoint.get("model"), Mapping):
        raise CheckpointError(f"{path}: not one of our model checkpoints (no model_config/model); "
                              "train with src.train.train_bestfitting or src.train.train_cellwise")
    try:
        model = DenseNetClassifier(**config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its weights do not fit its model_config "
                              f"({(str(error).splitlines() or [''])[0][:160]})") from None
    return model.to(device).eval()
