"""`python -m peftcalc`: the command line (peftcalc.cli)."""

from peftcalc.cli import main

main()
