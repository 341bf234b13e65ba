"""Evaluation: stream a model over benchmark inputs and score what it makes with :mod:`liveavatar.metrics`
(``toy_bench``: held-out toy-world clips; ``toy_compare``: the trained-vs-untrained report of
``eval/toy_compare.py``)."""
