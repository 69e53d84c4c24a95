"""The one exception type of vlmask and its interventions, at the bottom of the import graph.

It lives here, in the lowest layer, so that ``interventions`` imports without ``vlmask``;
``vlmask.VlmaskError`` is the same class.
"""


class VlmaskError(Exception):
    """A problem with what the user asked for: the message says what arrived and what would be accepted.

    Example:
        >>> raise VlmaskError("key position 812 is out of range: the prompt has 640 tokens (0-639)")
        Traceback (most recent call last):
        ...
        vlmask.VlmaskError: key position 812 is out of range: the prompt has 640 tokens (0-639)

    ``option``, where known, names the option or parameter the problem is about (``"mask"``,
    ``"layer"``, ...): the message itself stays neutral, and the command line names its flag.
    """

    def __init__(self, *args: object, option: str | None = None) -> None:
        super().__init__(*args)
        self.option = option


VlmaskError.__module__ = "vlmask"  # its public name: tracebacks read vlmask.VlmaskError
