"""Evaluation of learned representations: nearest-neighbour retrieval and the recognition test
(fine-tuning's test, and `iicrepro evaluate` on a classifier checkpoint as it is)."""
