"""Retraining: datasets, synthetic data, fine-tuning, evaluation, MLflow registry, promotion.

A package beside ``triage`` (installed with the ``train`` extra). It imports ``triage`` (the
same preprocessing and model code as serving, so the two cannot drift); nothing in
``triage`` imports it.
"""
