"""Kept for the modules still importing it; the checks live in `_bundle_checks`."""

from ._bundle_checks import check_local_bundle  # noqa: F401
