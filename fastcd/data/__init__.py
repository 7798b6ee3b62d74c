"""Loaders: one interface (`BatchLoader`), backends chosen by `data.backend` (see `base.BACKENDS`)."""
from fastcd.data.base import BatchLoader, LoaderContext, build_loader

__all__ = ["BatchLoader", "LoaderContext", "build_loader"]
