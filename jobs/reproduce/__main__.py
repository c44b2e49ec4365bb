"""`python -m jobs.reproduce …`: the `cfvit reproduce` verb."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
