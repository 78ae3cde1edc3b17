"""Classifier rewards on images (the face demographic classifiers of ``mmalign.image.classifiers``).

The image backend is imported only when a classifier is built by name, so ``mmalign.rewards`` stays importable
(and text-only runs stay light) without it.

- ``mode="attribute"``: the classifier's probability of a requested label, e.g. ``female``; the label is fixed
  (``target``) or read from the prompt (``target="from_prompt"``: the first label word of the attribute found in
  the prompt, e.g. "a photo of a black doctor" → ``black``).
- ``mode="balance"``: how much an image adds to its group's attribute balance (SPEC §6's Simpson index):
  ``1 − Σ_c q_i(c) · q̄(c)`` with ``q_i`` the image's label probabilities and ``q̄`` the group mean (the outputs
  of the same prompt, ``group_ids``). The mean over a group is the soft Simpson index of the group, and an
  image of an under-represented label scores higher than one of the majority label.

Images without a face (the classifier says ``face_found=False``) score ``no_face``.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

import numpy as np
import torch

from mmalign.rewards.base import Reward, RewardError

__all__ = ["ClassifierReward"]


class ClassifierReward(Reward):
    def __init__(self, classifier: Any = "fairface-cnn", *, attribute: str = "gender",
                 mode: Literal["attribute", "balance"] = "balance", target: Optional[str] = None,
                 no_face: float = 0.0, name: Optional[str] = None, **classifier_kwargs: Any):
        if isinstance(classifier, str):
            from mmalign.image.classifiers import load_classifier  # lazy: the image backend only when used

            classifier = load_classifier(classifier, **classifier_kwargs)
        if not hasattr(classifier, "classify"):
            raise TypeError(f"classifier reward: {classifier!r} has no classify(images) method")
        attributes = tuple(getattr(classifier, "attributes", (attribute,)))
        if attribute not in attributes:
            raise ValueError(f"classifier reward: classifier {getattr(classifier, 'name', classifier)!r} predicts "
                             f"{attributes}, not {attribute!r}")
        if mode not in ("attribute", "balance"):
            raise ValueError(f"classifier reward: mode must be 'attribute' or 'balance'; got {mode!r}")
        if mode == "attribute" and not target:
            raise ValueError("classifier reward: mode 'attribute' needs target (a label, or 'from_prompt')")
        self.classifier, self.attribute, self.mode, self.target = classifier, attribute, mode, target
        self.no_face = float(no_face)
        self.needs_groups = mode == "balance"
        self.name = name or f"classifier:{attribute}:{mode}" + (f"={target}" if target else "")

    def _probabilities(self, outputs) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """[N, C] label probabilities, [N] face found (bool), label names."""
        from mmalign.image.classifiers.base import as_uint8_batch

        predictions = self.classifier.classify(as_uint8_batch(outputs))[self.attribute]
        if len(predictions) != len(outputs):
            raise RewardError(f"reward {self.name!r}: the classifier returned {len(predictions)} predictions for "
                              f"{len(outputs)} images")
        labels = list(predictions[0].probabilities) if predictions else []
        probs = np.array([[p.probabilities.get(label, 0.0) for label in labels] for p in predictions], dtype=np.float64)
        found = np.array([p.face_found is not False for p in predictions])
        return probs, found, labels

    def _requested(self, prompt: str, labels: list[str]) -> str:
        if self.target != "from_prompt":
            if self.target not in labels:
                raise RewardError(f"reward {self.name!r}: target {self.target!r} is not a label of "
                                  f"{self.attribute} ({labels})")
            return self.target
        for label in labels:
            if re.search(rf"\b{re.escape(label)}\b", prompt, re.IGNORECASE):
                return label
        raise RewardError(f"reward {self.name!r}: prompt {prompt[:80]!r} names no {self.attribute} label {labels}")

    def __call__(self, prompts, outputs, *, group_ids=None):
        if not len(outputs):
            return torch.zeros(0)
        probs, found, labels = self._probabilities(outputs)
        if self.mode == "attribute":
            scores = np.array([probs[i, labels.index(self._requested(p, labels))] for i, p in enumerate(prompts)])
        else:
            ids = np.asarray(group_ids)
            scores = np.zeros(len(outputs))
            for group in np.unique(ids):
                members = np.nonzero((ids == group) & found)[0]
                if len(members):
                    mean = probs[members].mean(0)
                    scores[members] = 1.0 - probs[members] @ mean
        scores[~found] = self.no_face
        return torch.tensor(scores, dtype=torch.float32)
