"""`python -m jobs.train --config … [--set key=value …]`: the `cfvit train` verb (the Ray job entrypoint)."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
