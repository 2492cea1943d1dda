"""`mlxft bench`: the same training work on each backend, each in a fresh process."""
