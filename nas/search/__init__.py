"""Search over rating tables: the interchange format (:mod:`nas.search.ratings`), exact constrained search
(:mod:`nas.search.constrained`), ranking against ground truth (:mod:`nas.search.ranking`,
:mod:`nas.search.groundtruth`). ``python -m nas.search METHOD`` runs a search method (:mod:`nas.cli`).

Submodules are imported explicitly (``from nas.search.ratings import RatingTable``) so that
``python -m nas.search.constrained`` and ``python -m nas.search.ranking`` run without a double import.
"""
