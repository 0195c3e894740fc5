"""``python -m bench``: see :func:`bench.run.main`; ``python -m bench static``: see
:mod:`bench.static`."""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["static"]:
        from .static import main as static_main
        sys.exit(static_main(sys.argv[2:]))
    from .run import main
    sys.exit(main())
