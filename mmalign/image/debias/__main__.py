"""``python -m mmalign.image.debias`` = ``python -m mmalign_experiments.debias``: the debiasing experiment."""
from mmalign_experiments.debias.cli import main

main()
