"""Moved to :mod:`reslab.models.pretrained` (the model layer adapts weights itself); this module
keeps the old import path working."""

from reslab.models.pretrained import LoadReport, adapt_input_conv, load_pretrained

__all__ = ["LoadReport", "adapt_input_conv", "load_pretrained"]
