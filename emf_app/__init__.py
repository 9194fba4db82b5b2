"""The application: the `emf` command line (cli.py) and the demo (demo.py), on top of every layer."""
