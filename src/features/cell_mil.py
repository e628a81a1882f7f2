"""A multiple-instance cell classifier on the cell descriptors, fit to image labels alone.

Broadcasting an image's labels to its cells tells every cell of a field that shows a class in a
minority of its cells that it does not show it, and every cell of a field labelled with a class that
it does. Here a small MLP gives each cell a probability p per class, and only the field's summary of
them meets the label: the field's mean m over its cells is pooled into the probability that the field
is labelled, sigmoid(POOL_SLOPE * (m - threshold)), and the log loss is taken against the image
label. A few positive cells in an unlabelled field, or a few negative ones in a labelled field, then
cost little, as long as the field's share stays on the right side of the threshold.

The threshold (the share of a field's cells above which it counts as labelled) cannot be learned
from the labels: every value fits them about equally well (a learned one stays where it starts).
It is a prior on how labels were made: 0.3 chosen on synthetic style 1 (README).

The fitted model is plain numpy (weights of `n_models` MLPs fit from different seeds, the
descriptors' standardisation and their training range, to which new cells are clipped), so
prediction needs no torch.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

from src.data.classes import NEGATIVE, NUM_CLASSES

POOL_THRESHOLD = 0.3  # share of a field's cells above which the field is taken as labelled (chosen on style 1)
POOL_SLOPE = 30.0     # steepness of the pooling around the threshold (per unit of share)
# MLPs averaged: their seeds disagree on the cells the labels leave open; 10 against 3 raised the MLPs
# alone on both synthetic styles (0.9346 -> 0.9411, 0.6959 -> 0.6986) for ~1 s each (README)
MIL_MODELS = 10


def _network(n_inputs: int, hidden: int, n_outputs: int, dropout: float) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_inputs, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_outputs))


def field_probability(cell_probabilities: torch.Tensor, field_index: torch.Tensor, n_fields: int,
                      threshold: float = POOL_THRESHOLD) -> torch.Tensor:
    """(n_fields, C) probability that each field is labelled: sigmoid(POOL_SLOPE * (mean over its cells - threshold))."""
    counts = torch.bincount(field_index, minlength=n_fields).clamp(min=1).to(cell_probabilities.dtype)[:, None]
    share = torch.zeros(n_fields, cell_probabilities.shape[1], dtype=cell_probabilities.dtype)
    share = share.index_add(0, field_index, cell_probabilities) / counts
    return torch.sigmoid(POOL_SLOPE * (share - threshold))


def fit_mil_model(features: np.ndarray, field_index: np.ndarray, field_labels: np.ndarray, seed: int = 0,
                  n_models: int = MIL_MODELS, epochs: int = 300, hidden: int = 64, learning_rate: float = 3e-3,
                  weight_decay: float = 1e-3, dropout: float = 0.2, threshold: float = POOL_THRESHOLD) -> dict:
    """Fit on (N, F) `features` of cells, `field_index` (N,) the row of each cell's field in
    `field_labels` (n_fields, 19) multi-hot image labels. Full-batch AdamW for `epochs` steps per model,
    model k seeded with `seed + k`. Negative is not fit (min over classes of 1 - P, where used); a class
    no field is labelled with, or every field is, is not fit either and predicts its field rate."""
    features = np.asarray(features, np.float64)
    field_index = np.asarray(field_index, np.int64)
    field_labels = np.asarray(field_labels, np.float64)
    if features.ndim != 2 or len(features) != len(field_index) or field_labels.shape[1:] != (NUM_CLASSES,):
        raise ValueError(f"features {features.shape}, field index {field_index.shape} and field labels "
                         f"{field_labels.shape} do not match")
    if len(features) and (field_index.min() < 0 or field_index.max() >= len(field_labels)):
        raise ValueError("a field index is outside the field labels")
    rate = field_labels.mean(0) if len(field_labels) else np.zeros(NUM_CLASSES)
    classes = [cls for cls in range(NUM_CLASSES) if cls != NEGATIVE and 0 < rate[cls] < 1]
    if len(features):
        low, high, mean, spread = features.min(0), features.max(0), features.mean(0), features.std(0)
    else:
        low = high = mean = np.zeros(features.shape[1])
        spread = np.ones(features.shape[1])
    scale = np.where(spread > 1e-6, spread, 1.0)
    model = {"mean": mean, "scale": scale, "low": low, "high": high, "classes": classes, "rate": rate, "networks": []}
    if not classes:
        return model
    inputs = torch.tensor((features - mean) / scale, dtype=torch.float32)
    cells_field = torch.from_numpy(field_index)
    targets = torch.tensor(field_labels[:, classes], dtype=torch.float32)
    for k in range(n_models):
        torch.manual_seed(seed + k)
        network = _network(features.shape[1], hidden, len(classes), dropout)
        optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay)
        network.train()
        for _ in range(epochs):
            optimiser.zero_grad()
            labelled = field_probability(torch.sigmoid(network(inputs)), cells_field, len(field_labels), threshold)
            loss = torch.nn.functional.binary_cross_entropy(labelled.clamp(1e-5, 1 - 1e-5), targets)
            loss.backward()
            optimiser.step()
        linear = [layer for layer in network if isinstance(layer, torch.nn.Linear)]
        model["networks"].append([(layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy())
                                  for layer in linear])
    return model


def predict_mil_model(model: dict, features: np.ndarray) -> np.ndarray:
    """(N, 19) cell probabilities, the mean over the model's networks; Negative is 0 here."""
    features = np.asarray(features, np.float64)
    probabilities = np.zeros((len(features), NUM_CLASSES))
    unfit = [cls for cls in range(NUM_CLASSES) if cls != NEGATIVE and cls not in model["classes"]]
    probabilities[:, unfit] = np.asarray(model["rate"])[unfit]
    if not len(features) or not model["networks"]:
        return probabilities
    # a descriptor beyond the range it spanned in training is held at that range's end, as the trees
    # do: an unseen style must not drive the ReLU layers to extrapolate far from the training cells
    inputs = (np.clip(features, model["low"], model["high"]) - model["mean"]) / model["scale"]
    total = np.zeros((len(features), len(model["classes"])))
    for layers in model["networks"]:
        activations = inputs
        for depth, (weight, bias) in enumerate(layers):
            activations = activations @ weight + bias
            if depth < len(layers) - 1:
                activations = np.maximum(activations, 0)
        total += expit(activations)
    probabilities[:, model["classes"]] = total / len(model["networks"])
    return probabilities
