"""Failures of data prep that are the input's fault, reported without a traceback (exit 1)."""


class PrepError(Exception):
    """Base: the message says which input and why."""


class UnreadableInputs(PrepError):
    """Some inputs could not be read at all: the docs stage cannot complete."""


class RejectedShareExceeded(PrepError):
    """An input's share of unreadable records is above data.max_rejected_share."""
