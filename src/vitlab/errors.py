"""User-facing errors.

A `VitlabError` carries a one-line message that says what was wrong and what to do. The CLI prints it as
``error: <message>`` and exits with status 2 instead of showing a traceback; library callers can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VitlabError(Exception):
    """An error caused by the user's input (a name, a file, a shape), with a one-line explanation."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Format the closest matches of `name` among `choices` for an error message ('' if none are close)."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
