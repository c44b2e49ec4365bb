"""`python -m jobs.tune …`: the `cfvit tune` verb."""
from .cli import app

if __name__ == "__main__":
    app(prog_name="python -m jobs.tune")
