"""`python -m recsys` is the `recsys` command."""

from recsys.cli import app

app(prog_name="recsys")
