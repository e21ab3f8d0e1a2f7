"""The three kinds of failure a run can meet, each handled in one place (see run.py).

ConfigError  -> found before any network call; one line naming what to fix; exit 2.
RecordError  -> this record cannot be sent now; logged with its id, left for a later run; the others go on.
OutageError  -> Knack or the ESB cannot be reached after retries; the run stops early; exit 1.
"""


class ConfigError(Exception):
    """A usage or configuration problem the operator must fix."""


class RecordError(Exception):
    """One record cannot be processed (bad data, unknown activity, ESB rejection)."""


class OutageError(Exception):
    """A remote system is unreachable or answers nonsense even after retries."""
