"""Entry for `python -m cltune` and `accelerate launch -m cltune`."""

from cltune.cli import main

main()
