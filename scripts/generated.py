"""Tables generated from the code into the docs, between a pair of markers.

A script owns one table (``table()``), prints it, or with ``--write`` puts it into its
document; a test compares the document with ``splice`` of the current table, so a doc
can only show what the code declares.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def splice(text: str, begin: str, end: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}{end}{tail}"


def main(description: str, document: Path, begin: str, end: str, table: Callable[[], str]) -> None:
    """Print the table, or write it into ``document`` (``--write``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write", action="store_true", help=f"update {document.name}")
    if parser.parse_args().write:
        document.write_text(splice(document.read_text(), begin, end, table()))
    else:
        print(table(), end="")
