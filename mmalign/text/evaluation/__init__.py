"""Evaluation of text policies: sampling metrics, preference accuracy, RNG uniformity and judges."""
