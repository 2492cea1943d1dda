from mlxft.cli import main

main()
