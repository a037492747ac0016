"""The formats the contracts' field comments promise, checked the same way everywhere.

Formats the contracts cannot state as a field rule (a language tag to canonicalise, an
e-mail address the MIME builder must be able to send to) but several services check:
the rules live here once (field formats are buf.validate rules in proto/). Always
``fullmatch`` the patterns: ``$`` would let a trailing newline through.
"""

from __future__ import annotations

import re

# What no header value (an e-mail subject, a display name, a push title) may contain: a
# CR or LF starts a new header (injection), a NUL is refused by mail servers. Checked
# when a send is accepted (variables reaching a one-line field), when a one-line field
# is rendered and when the message is built, by this one definition.
HEADER_BREAKS = re.compile(r"[\r\n\x00]")


def breaks_header(text: str) -> bool:
    """Whether ``text`` holds a character no header value may contain."""
    return HEADER_BREAKS.search(text) is not None


# BCP 47-ish: a 2-3 letter language, then subtags of 1-8 letters or digits ("fr-CA",
# "zh-Hant-TW", "sr-Latn"), at most 35 characters. Full RFC 5646 checking is not worth
# a dependency here.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,6}")
MAX_LANGUAGE_TAG_LENGTH = 35


def is_language_tag(value: str) -> bool:
    """True for a well-formed, not too long language tag."""
    return len(value) <= MAX_LANGUAGE_TAG_LENGTH and LANGUAGE_TAG.fullmatch(value) is not None


# E-mail addresses. user_svc stores only what the e-mail worker can put on the wire, so
# a user is never told "created" for an address every later notification fails on; both
# call ``email_address_problem``. The rule is the dot-atom subset of RFC 5322 that SMTP
# without SMTPUTF8 carries: no quoted local parts, comments, address literals or folding
# whitespace (each a way to smuggle ``<``, ``,`` or a second address into a header), and
# ASCII only. An internationalised domain is accepted in its IDNA A-label form
# (``xn--…``) and refused in Unicode form, by both sides alike: the worker does not
# convert addresses, so accepting the Unicode form here would store an address it
# refuses. RFC 5321 limits: local part 64 octets, the whole address 254 (which keeps the
# domain within its own limit of 255), each domain label 63.
MAX_EMAIL_ADDRESS = 254
MAX_EMAIL_LOCAL_PART = 64
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
EMAIL_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# Host-name labels of letters, digits and inner hyphens, at least two of them (SendGrid,
# too, refuses ``ada@localhost``); the last is alphabetic or an A-label.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = r"[A-Za-z]{2,63}|[Xx][Nn]--[A-Za-z0-9](?:[A-Za-z0-9-]{0,57}[A-Za-z0-9])?"
EMAIL_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+(?:{_TOP_LABEL})")


def email_address_problem(address: str) -> str | None:
    """Why ``address`` is not a recipient we can send to, or None when it is one.

    The reason is for a client ("local part must be at most 64 characters") and never
    quotes the address back. ``=?`` is refused in the local part although RFC 5322 allows
    it: receivers decode encoded words even inside an addr-spec (Python's parser does),
    so ``=?utf-8?q?=0D=0A?=@x.com`` would read back with a line break in it.
    """
    if len(address) > MAX_EMAIL_ADDRESS:
        return f"must be at most {MAX_EMAIL_ADDRESS} characters"
    if any(ch.isspace() or not ch.isprintable() for ch in address):
        return "must not contain whitespace or control characters"
    if not address.isascii():
        return "must be ASCII; write an international domain in its IDNA form (xn--...)"
    local, _, domain = address.partition("@")
    if address.count("@") != 1:
        return "must contain exactly one @"
    if not local or not domain:
        return "needs a local part and a domain"
    if len(local) > MAX_EMAIL_LOCAL_PART:
        return f"local part must be at most {MAX_EMAIL_LOCAL_PART} characters"
    if "=?" in local:
        return "local part must not contain =? (it reads as an encoded word)"
    if EMAIL_LOCAL_PART.fullmatch(local) is None:
        return (
            "local part may hold letters, digits, !#$%&'*+/=?^_`{|}~- and single inner dots"
            " (no quotes, comments or brackets)"
        )
    if EMAIL_DOMAIN.fullmatch(domain) is None or not all(map(_is_a_label, domain.split("."))):
        return "domain must be a host name such as example.com (IDNA xn-- form if international)"
    return None


def _is_a_label(label: str) -> bool:
    """False for an ``xn--`` label that is not well-formed Punycode (no IDN at all)."""
    if label[:4].lower() != "xn--":
        return True
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return False
    return bool(decoded) and not decoded.isascii()
