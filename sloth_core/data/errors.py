"""The one error the data pipeline raises on purpose."""

from __future__ import annotations

from sloth_core.errors import SlothError


class DataError(SlothError, ValueError):
    """Training data that cannot be used as it is.

    The message names where (file and line, or row number) and what (the field or the
    setting) went wrong, so that the user can fix the data rather than read a traceback.
    A ``ValueError`` too, for callers that catch bad values generically.
    """
