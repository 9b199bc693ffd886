from peftcalc.cli import main

main()
