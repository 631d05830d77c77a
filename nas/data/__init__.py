"""Data of the searches: scikit-learn's digits (:mod:`nas.data.digits`) and BYOL views (:mod:`nas.data.views`)."""

from nas.data.digits import DigitsDataModule, digits_split_indices, load_digits_split
from nas.data.views import ViewConfig, make_view, make_views

__all__ = ["DigitsDataModule", "digits_split_indices", "load_digits_split", "ViewConfig", "make_view", "make_views"]
