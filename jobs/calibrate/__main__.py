"""`python -m jobs.calibrate …`: the `cfvit calibrate` verb."""
from .cli import app

if __name__ == "__main__":
    app(prog_name="python -m jobs.calibrate")
