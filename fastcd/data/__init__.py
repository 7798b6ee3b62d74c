"""Loaders: one interface (`BatchLoader`), backends chosen by `data.backend` (see `base.BACKEND_MODULES`)."""
from fastcd.data.base import BatchLoader, LoaderContext, build_loader, register_loader

__all__ = ["BatchLoader", "LoaderContext", "build_loader", "register_loader"]
