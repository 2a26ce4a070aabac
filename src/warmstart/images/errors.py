"""Errors raised by ``warmstart.images``.

Every class descends from :class:`ImageError`, itself a :class:`WarmstartError`, so callers
that only care whether an image operation failed catch one class, while the lazy filesystem
can tell a corrupt chunk (answer EIO, never wrong bytes) from a dead registry (retry).
"""

from __future__ import annotations

from warmstart.errors import InvalidParameter, WarmstartError


class ImageError(WarmstartError):
    """An image could not be resolved, fetched, converted or unpacked."""


class InvalidReference(ImageError, InvalidParameter):
    """An image reference or digest is malformed (the caller's mistake: HTTP 400)."""


class RegistryError(ImageError):
    """The registry failed (network or HTTP error) after all retries."""


class AuthError(RegistryError):
    """The registry refused our credentials."""


class NotFound(ImageError):
    """A manifest or blob does not exist in the registry."""


class DigestMismatch(ImageError):
    """Content did not hash to the digest that names it."""


class UnsafeLayer(ImageError):
    """A layer holds entries that would escape or damage the unpack target."""


class CorruptLayer(ImageError):
    """A layer blob does not decompress, or is not a tar archive."""


class EStargzError(ImageError):
    """A blob is not valid eStargz (footer, TOC or member malformed)."""


class ChunkDigestError(EStargzError):
    """A chunk's bytes do not match the ``chunkDigest`` recorded in the verified TOC."""
