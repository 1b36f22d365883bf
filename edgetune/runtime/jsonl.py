"""Lines of a JSONL data file, read as bytes with a size cap and checked to be UTF-8 text.

Training data may come from anywhere, so nothing here trusts it:
  * a line is read in bounded pieces; one longer than ``max_bytes`` is reported as soon as
    ``max_bytes + 1`` bytes are in, never read whole into memory (the rest is skipped in 64 KiB
    pieces only if the caller goes on, e.g. under --skip-bad);
  * a line with a NUL byte (binary data, or UTF-16 without a byte-order mark) or bytes that are
    not UTF-8 is reported with its line and byte position;
  * a UTF-16/UTF-32 byte-order mark refuses the whole file (every line would be bad); a UTF-8
    byte-order mark is dropped, as editors on Windows write one.
Per-line problems are yielded as ``DataError`` values so the caller decides: stop, or skip and
count them.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterator

from edgetune.errors import DataError

MAX_RECORD_BYTES = 1 << 20  # 1 MiB per line: far above any real record, far below a memory problem
_SKIP_PIECE = 1 << 16
_WIDE_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _size(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


def jsonl_lines(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str | DataError]]:
    """Yield (line number, text without the line break | DataError) for each line of ``path``.

    Raises DataError for what makes the whole file unreadable (missing, a directory, UTF-16).
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror}); give a readable JSONL file.") from None
    with handle:
        head = handle.read(4)
        for bom, encoding in _WIDE_BOMS:
            if head.startswith(bom):
                raise DataError(f"{path.name} line 1: the file is {encoding} text (it starts with a {encoding} "
                                "byte-order mark); save it as UTF-8 JSONL.")
        handle.seek(len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0)
        number = 0
        while True:
            piece = handle.readline(max_bytes + 1)
            if not piece:
                return
            number += 1
            where = f"{path.name} line {number}"
            line = piece.rstrip(b"\r\n") if piece.endswith(b"\n") else piece
            if len(line) > max_bytes:
                yield number, DataError(f"{where}: the record is longer than the {_size(max_bytes)} a line may hold; "
                                        "shorten or split it")
                while piece and not piece.endswith(b"\n"):  # the rest of the long line, in bounded pieces
                    piece = handle.readline(_SKIP_PIECE)
                continue
            yield number, _decode(line, where)


def _decode(line: bytes, where: str) -> str | DataError:
    nul = line.find(b"\0")
    if nul >= 0:
        return DataError(f"{where}: a NUL byte at byte {nul + 1}: binary data or UTF-16 text, not UTF-8 JSON; "
                         "give a UTF-8 JSONL file")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataError(f"{where}: not UTF-8 text (byte 0x{line[exc.start]:02x} at byte {exc.start + 1}); "
                         "save the file as UTF-8")
