"""``python -m training`` (what ``torchrun -m training fit ...`` runs)."""

from training.cli import app

app()
