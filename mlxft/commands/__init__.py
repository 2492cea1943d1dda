"""The `mlxft` subcommands, one module per command family; `mlxft.cli` registers them and none
imports it."""
