"""``python -m segvoc.bench``: see ``segvoc.bench.benchmark``."""

from segvoc.bench.benchmark import main

if __name__ == "__main__":
    main()
