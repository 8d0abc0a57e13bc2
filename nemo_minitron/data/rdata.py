"""Read the character vectors of an installed R package's lazy-loaded data (``data/Rdata.rdx`` + ``Rdata.rdb``).

Only what the embedded Austen corpus needs (R's ``janeaustenr``, as Debian's ``r-cran-janeaustenr`` ships
it): R's XDR serialization format, versions 2 and 3 ("R Internals", section 1.8), for NULL, symbols,
pairlists, character/logical/integer/double vectors and lists, with their attributes. An index entry of the
``.rdx`` file points at one blob of the ``.rdb`` file: a 4-byte big-endian length and a zlib stream.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

from nemo_minitron.errors import UserError

_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
_NILVALUE_SXP, _REFSXP = 254, 255
_NA_INT = -(2**31)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what
        self.refs: list = []

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.what}: truncated R serialization")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            upper, lower = self.int(), self.int()
            n = (upper << 32) + lower
        return n

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise UserError(f"{self.what}: not an XDR R serialization")
        version = self.int()
        self.int(), self.int()  # the writer's and the minimal reader's R versions
        if version == 3:
            self.bytes(self.int())  # native encoding name
        elif version != 2:
            raise UserError(f"{self.what}: R serialization version {version} (2 or 3 are read)")

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LISTSXP:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = self.item()
            tail = self.item()
            del attrs
            return [(tag, head)] + (tail if isinstance(tail, list) else [])
        if kind == _CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8" if flags & (1 << 15) == 0 else "latin-1")
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            values = [None if v == _NA_INT else v for v in struct.unpack(f">{n}i", self.bytes(4 * n))]
        elif kind == _REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        elif kind in (_STRSXP, _VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise UserError(f"{self.what}: R object type {kind} is not read here")
        attrs = dict(self.item()) if has_attr else {}
        names = attrs.get("names")
        return dict(zip(names, values)) if names is not None else values


def unserialize(data: bytes, what: str):
    """The R object serialized (XDR) in ``data``: vectors as Python lists (dicts when they have names),
    pairlists as ``[(tag, value)]``; other attributes are dropped."""
    reader = _Reader(data, what)
    reader.header()
    return reader.item()


def lazyload_vectors(data_dir: Path) -> dict[str, list]:
    """Every object of the lazy-load database ``data_dir/Rdata.{rdx,rdb}`` by name, as :func:`unserialize`
    returns it."""
    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
        blob = rdb.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{data_dir}: cannot read the R data ({exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise UserError(f"{rdx}: not an R lazy-load index")
    found = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        found[name] = unserialize(_blob(blob[offset : offset + length], f"{rdb}:{name}"), f"{rdb}:{name}")
    return found


def _blob(part: bytes, what: str) -> bytes:
    """One lazy-load blob: 4 bytes of uncompressed length, then a zlib stream (R's default), or a type byte
    (``2`` bzip2, ``Z`` xz, ``0`` stored) and the data (R's ``compress = 2, 3``)."""
    try:
        if part[4:5] == b"2":
            return bz2.decompress(part[5:])
        if part[4:5] == b"Z":
            return lzma.decompress(part[5:])
        if part[4:5] == b"0":
            return part[5:]
        return zlib.decompress(part[4:])
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise UserError(f"{what}: cannot decompress the R data ({exc})") from None
