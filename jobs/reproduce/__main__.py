"""`python -m jobs.reproduce …`: the `cfvit reproduce` verb."""
from .cli import app

if __name__ == "__main__":
    app(prog_name="python -m jobs.reproduce")
