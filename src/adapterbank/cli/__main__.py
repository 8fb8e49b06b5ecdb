"""``python -m adapterbank.cli``: the ``adapterbank`` command."""

from adapterbank.cli.main import main

main()
