"""`python -m xdctools` (and `torchrun -m xdctools train ...`) enter the CLI."""

from xdctools.cli import main

if __name__ == "__main__":
    main()
