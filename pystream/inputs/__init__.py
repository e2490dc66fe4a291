"""Inputs: models and texts to stream (the bottom layer)."""
