from mmalign_experiments.debias.cli import main

main()
