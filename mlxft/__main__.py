"""`python -m mlxft …`: the same command line as `mlxft …`."""

from mlxft.cli import main

main()
