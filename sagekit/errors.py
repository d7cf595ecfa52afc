"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class SagekitError(Exception):
    """A problem with the user's input or environment: the message says what is wrong and what to do."""


class DiskFullError(SagekitError):
    """Out of disk space: a rerun after freeing space can resume, so compress keeps what it finished."""
