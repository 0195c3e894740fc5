"""``python -m arcface_kernels``: the same command line as ``arcface-kernels``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
