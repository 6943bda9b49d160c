"""`python -m loratune`: what torchrun runs on each process (`torchrun ... -m loratune train run.yaml`)."""

import sys

from loratune.cli import program

sys.exit(program())
