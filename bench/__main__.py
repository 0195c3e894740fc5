"""``python -m bench``: see :func:`bench.run.main`."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
