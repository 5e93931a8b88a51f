"""Evaluation of learned representations: nearest-neighbour retrieval and recognition accuracy."""
