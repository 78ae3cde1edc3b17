from mmalign.image.debias.cli import main

main()
