"""Lands with its stage's issue; listed in dvc.yaml so the stage graph is complete."""
