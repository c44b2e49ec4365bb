"""`python -m jobs.train --config … [--set key=value …]`: the `cfvit train` verb (the Ray job entrypoint)."""
from .cli import app

if __name__ == "__main__":
    app(prog_name="python -m jobs.train")
