"""`python -m jobs.tune …`: the `cfvit tune` verb."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
