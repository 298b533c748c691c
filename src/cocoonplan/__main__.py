"""``python -m cocoonplan``."""

from cocoonplan.cli import main

main()
