"""The one exception type vlmask raises for user mistakes (defined with the interventions, below vlmask)."""

from interventions.errors import VlmaskError

__all__ = ["VlmaskError"]
