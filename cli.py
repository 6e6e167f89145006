"""`python cli.py ...` is the same app as the `mimo-spec` console script."""

from mimo_spec.app import main

if __name__ == "__main__":
    main()
