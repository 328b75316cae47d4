"""A module with no side effects, imported lazily by a synthetic load (``lazy_import``)."""

LOADED = True
