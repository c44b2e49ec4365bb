"""`python -m jobs.calibrate --checkpoint … --budgets …`: the `cfvit calibrate` verb."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
