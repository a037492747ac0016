"""The formats the contracts' field comments promise, checked the same way everywhere.

A template id or a language tag accepted by the gateway must be one that template_svc
and user_svc accept too, so the patterns live here once. Always ``fullmatch`` them:
``$`` would let a trailing newline through.
"""

from __future__ import annotations

import re

# Template ids: 1-63 of a-z, 0-9, "-" and "_", starting with a letter.
TEMPLATE_ID = re.compile(r"[a-z][a-z0-9_-]{0,62}")

# BCP 47-ish: a 2-3 letter language, then subtags of 1-8 letters or digits ("fr-CA",
# "zh-Hant-TW", "sr-Latn"), at most 35 characters. Full RFC 5646 checking is not worth
# a dependency here.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,6}")
MAX_LANGUAGE_TAG_LENGTH = 35

# The canonical UUID text form only: uuid.UUID() also takes "{...}", "urn:uuid:..." and
# no dashes, which would then name the same user two ways.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def is_language_tag(value: str) -> bool:
    """True for a well-formed, not too long language tag."""
    return len(value) <= MAX_LANGUAGE_TAG_LENGTH and LANGUAGE_TAG.fullmatch(value) is not None
