"""Errors raised by ``warmstart.images``.

    ImageError (a WarmstartError)  an image could not be resolved, fetched, converted, ...
    ├── InvalidReference           a malformed reference or digest (also InvalidParameter)
    ├── RegistryError              the registry failed after all retries
    │   └── AuthError              the registry refused our credentials
    ├── ImageAccessDenied          the deployer may not pull the image (also InvalidParameter)
    ├── ImageNotFound              no such manifest or blob (also the common NotFound)
    ├── DigestMismatch             content did not hash to the digest that names it
    ├── UnsafeLayer                a layer would escape or damage the unpack target
    ├── CorruptLayer               a layer blob is not a (compressed) tar archive
    ├── EStargzError               a blob is not valid eStargz
    │   └── ChunkDigestError       a chunk does not match its verified chunk digest
    └── FetchError                 the lazy filesystem could not get a chunk's bytes

Callers that only care whether an image operation failed catch :class:`ImageError`; the
API and the CLI see the common classes (:class:`~warmstart.errors.NotFound`,
:class:`~warmstart.errors.InvalidParameter`) where one applies. The lazy filesystem tells
a corrupt chunk (answer EIO, never wrong bytes) from a dead registry (retry) before either
becomes a :class:`FetchError`.
"""

from __future__ import annotations

from warmstart.errors import InvalidParameter, NotFound, WarmstartError


class ImageError(WarmstartError):
    """An image could not be resolved, fetched, converted or unpacked."""


class InvalidReference(ImageError, InvalidParameter):
    """An image reference or digest is malformed (the caller's mistake: HTTP 400)."""


class RegistryError(ImageError):
    """The registry failed (network or HTTP error) after all retries."""


class AuthError(RegistryError):
    """The registry refused our credentials."""


class ImageAccessDenied(ImageError, InvalidParameter):
    """The registry would not let the deployer pull the image (their credentials, or none,
    were refused for its repository).  Not a :class:`RegistryError`: the node's own
    credentials may well work -- this is about who asked, and it is the caller's to fix
    (HTTP 400 ``InvalidParameterValueException``, as Lambda answers for an image it
    may not use)."""


class ImageNotFound(ImageError, NotFound):
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


class FetchError(ImageError):
    """Bytes of a lazily mounted layer could not be fetched, or did not verify: the read
    that wanted them answers EIO (the message says which blob and why)."""
