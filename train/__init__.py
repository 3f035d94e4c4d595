"""Barlow Twins pretraining and downstream evaluation (built in the pretraining and downstream issues)."""
