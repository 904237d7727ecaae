"""`python -m petctl` runs the CLI."""

from petctl.cli import main

main()
