from kve_lightning.cli import cli_main

cli_main()
