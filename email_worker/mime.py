"""Assemble the RFC 5322/2045 bytes of one notification e-mail directly.

``email.message.EmailMessage`` was measured at ~3.45 ms per mail, 28 times the cost of
rendering plus assembling the bytes by hand, and it cut the whole pipeline to a third;
what we send is always the same shape (one recipient, text and optional HTML, UTF-8),
so building it here is short. Bodies are quoted-printable (readable, 7-bit safe, no
line-length limits); headers with non-ASCII text or long lines become RFC 2047
encoded-words. CR/LF in any header value is refused: it would let template output or
a display name inject headers.

User text reaches a header only as text, never as syntax: a receiver that decodes
encoded words and parses the header gets back exactly the text we were given. So text
containing ``=?`` is always encoded itself (sent raw, ``=?utf-8?q?=0D=0A?=Bcc: x``
would decode into a line break, and parsers decode encoded words even inside quoted
strings and addr-specs), a display name with specials is quoted, and addresses follow
``notify_kit.formats.email_address_problem``, the rule user_svc accepts them by.
"""

from __future__ import annotations

import binascii
import re
import uuid
from base64 import b64encode
from email.utils import formatdate

from notify_kit import formats

# "=?utf-8?b?" + base64(39 bytes) + "?=" is 64 characters: within the 75 an encoded-word
# may have, and short enough that "Subject: " plus one word stays within 78.
_WORD_BYTES = 39
_FOLD = "\r\n "
_MAX_RAW_LINE = 78
_MESSAGE_ID_PART = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Text that may go on the wire as it is: printable ASCII words split by single spaces.
# Anything else (leading, trailing or doubled spaces, tabs) would not survive unfolding
# and whitespace normalisation exactly, so it is encoded. ``=?`` is checked separately.
_PLAIN_TEXT = re.compile(r"[!-~]+(?: [!-~]+)*")
# A display name may be a quoted-string when it is printable ASCII, tabs and spaces:
# quoted, every space survives (an encoded-word's decoded spaces are collapsed by some
# parsers, Python's among them). Bare it must be atoms (atext) split by single spaces.
_QUOTABLE = re.compile(r"[\t -~]+")
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# "From: " is the longer of the two address headers format_address is used for.
_ADDRESS_HEADER = len("From: ")


class MessageError(ValueError):
    """The job cannot become a safe message (header injection, bad address or id)."""


def check_header_value(name: str, value: str) -> str:
    """Return ``value`` unless it contains CR, LF or NUL (a header injection)."""
    if formats.breaks_header(value):
        raise MessageError(f"{name} contains a line break")
    return value


def check_address(address: str) -> str:
    """``address`` if it is one we can send to (``formats.email_address_problem``).

    The rule is shared with user_svc, so an address it accepted is never refused here;
    non-ASCII addresses would need SMTPUTF8 end to end, which this worker does not use.
    """
    check_header_value("address", address)
    problem = formats.email_address_problem(address)
    if problem is not None:
        raise MessageError(f"not an e-mail address ({problem}): {address!r}")
    return address


def _is_plain(value: str) -> bool:
    """True when ``value`` can be sent unencoded and still read back as exactly itself."""
    return "=?" not in value and _PLAIN_TEXT.fullmatch(value) is not None


def encode_words(value: str) -> str:
    """RFC 2047 B encoded-words for ``value``, folded so no line exceeds 78 characters."""
    words: list[str] = []
    chunk = bytearray()
    for char in value:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > _WORD_BYTES:
            words.append(_word(chunk))
            chunk = bytearray()
        chunk += data
    if chunk or not words:
        words.append(_word(chunk))
    return _FOLD.join(words)


def _word(data: bytes | bytearray) -> str:
    return f"=?utf-8?b?{b64encode(data).decode('ascii')}?="


def header_text(name: str, value: str) -> str:
    """An unstructured header value (Subject): raw when plain and short, else encoded-words.

    Plain means printable ASCII words with single spaces and no ``=?``; everything else is
    encoded, so no user text can be read by a receiver as an encoded word of its own.
    """
    check_header_value(name, value)
    if not value or (_is_plain(value) and len(name) + 2 + len(value) <= _MAX_RAW_LINE):
        return value
    return encode_words(value)


def format_address(name: str, address: str) -> str:
    """``Display Name <address>``, the name bare, quoted or RFC 2047-encoded as needed.

    Bare only when it is atoms; quoted (``\\`` and ``"`` escaped) when it is other
    printable ASCII, specials such as ``,`` ``<`` ``;`` ``:`` included, so it cannot add a
    recipient; encoded when it holds anything else (non-ASCII, controls, ``=?``, which
    parsers decode even inside a quoted-string) or is too long for one line. The address
    goes on a folded line of its own when it would not fit after the name.
    """
    check_address(address)
    check_header_value("display name", name)
    if not name:
        return address
    if _ATOMS.fullmatch(name):
        phrase = name
    else:
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    quotable = "=?" not in name and _QUOTABLE.fullmatch(name) is not None
    if not quotable or _ADDRESS_HEADER + len(phrase) > _MAX_RAW_LINE:
        phrase = encode_words(name)
    if _FOLD in phrase:
        last_line = 1 + len(phrase.rsplit(_FOLD, 1)[1])
    else:
        last_line = _ADDRESS_HEADER + len(phrase)
    if last_line + len(address) + 3 > _MAX_RAW_LINE:
        return f"{phrase}{_FOLD}<{address}>"
    return f"{phrase} <{address}>"


def quoted_printable(text: str) -> bytes:
    """UTF-8, quoted-printable, CRLF line endings."""
    normal = text.replace("\r\n", "\n").replace("\r", "\n")
    return binascii.b2a_qp(normal.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")


def _part(subtype: str, body: str) -> bytes:
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii") + quoted_printable(body)


def build_message(
    *,
    from_header: str,
    to_address: str,
    to_name: str,
    subject: str,
    text_body: str,
    html_body: str,
    notification_id: str,
) -> bytes:
    """The complete message: headers, then text/plain or multipart/alternative (text, HTML).

    ``from_header`` is already formatted (see ``format_address``); every other value is
    checked here, so a hostile job fails with ``MessageError`` instead of being sent.
    """
    if not _MESSAGE_ID_PART.fullmatch(notification_id):
        raise MessageError(f"unusable notification id {notification_id!r}")
    headers = (
        f"From: {from_header}\r\n"
        f"To: {format_address(to_name, to_address)}\r\n"
        f"Subject: {header_text('Subject', subject)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: <{notification_id}@notify>\r\n"
        f"X-Notify-Notification-Id: {notification_id}\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode("ascii")
    if not html_body:
        return headers + _part("plain", text_body)
    # "=_" never occurs in quoted-printable output, so the boundary cannot collide.
    boundary = f"=_notify_{uuid.uuid4().hex}"
    return b"".join(
        (
            headers,
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii"),
            f"--{boundary}\r\n".encode("ascii"),
            _part("plain", text_body),
            f"\r\n--{boundary}\r\n".encode("ascii"),
            _part("html", html_body),
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )
