"""The one exception type vlmask raises for user mistakes."""


class VlmaskError(Exception):
    """A problem with what the user asked for: the message says what arrived and what would be accepted.

    Example:
        >>> raise VlmaskError("key position 812 is out of range: the prompt has 640 tokens (0-639)")
        Traceback (most recent call last):
        ...
        vlmask._errors.VlmaskError: key position 812 is out of range: the prompt has 640 tokens (0-639)
    """
