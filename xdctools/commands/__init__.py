"""Click commands, one module each; registered lazily in xdctools/cli.py."""
