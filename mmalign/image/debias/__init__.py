"""The documented entry point ``python -m mmalign.image.debias``; the experiment lives in
:mod:`mmalign_experiments.debias` (nothing else here: the library never imports the experiments)."""
