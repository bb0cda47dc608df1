"""Errors raised by the store. Each message names the item and what is wrong."""


class StoreError(Exception):
    """Base class for store errors."""


class NotFoundError(StoreError):
    """A record that was asked for does not exist."""


class ConflictError(StoreError):
    """Someone else changed a record since the caller last read it."""


class ImageError(StoreError):
    """An image file is missing, unreadable or unsafe to decode."""


class FormatError(StoreError):
    """An import file does not follow the format it claims."""


class LeaseHeldError(StoreError):
    """Another live session holds the lease on a run; `lease` is its LeaseRecord."""

    def __init__(self, message: str, lease):
        super().__init__(message)
        self.lease = lease
