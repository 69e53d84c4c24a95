"""Intervention objects: small frozen values that say what to do to attention.

Example:
    >>> from interventions import BlockKeys
    >>> BlockKeys((18, 19), layers=(0, 1)).to_dict()
    {'type': 'BlockKeys', 'positions': [18, 19], 'layers': [0, 1]}
"""

from interventions.block_keys import BlockKeys, from_dict

__all__ = ["BlockKeys", "from_dict"]
