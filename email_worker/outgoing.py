"""One e-mail as every provider receives it: the rendered parts, not a wire format.

The SMTP provider assembles MIME bytes from it (``email_worker.mime``); the SendGrid
provider builds its JSON. Addresses and header text were checked by the handler before
an ``OutgoingEmail`` exists (no CR/LF, bare ASCII ``local@domain`` addresses).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """A rendered e-mail for one recipient, identified by its notification id."""

    notification_id: str
    from_name: str
    from_address: str
    to_name: str
    to_address: str
    subject: str
    text_body: str
    html_body: str  # empty: text only
