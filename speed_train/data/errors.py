"""Exceptions of the data layer: each message says what is wrong and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """A data source cannot be read, or too much of it is malformed."""


class RecipeError(DataError):
    """A recipe file is invalid (unknown key, bad value, unknown format, missing path)."""


class HubUnavailableError(DataError):
    """A recipe needs the Hugging Face Hub, which is unreachable, and nothing is cached locally."""
