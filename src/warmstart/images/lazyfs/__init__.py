"""The lazy image filesystem: a read-only FUSE view of one image's merged layers.

Run as ``python -m warmstart.images.lazyfs --spec FILE|- --ready-fd N`` by
:class:`warmstart.images.lazymount.LazyMounts`, one process per mounted image.

What it serves
    The layers of one image merged bottom → top, as overlayfs would merge them: eStargz
    layers from their verified TOC (no content fetched to list or stat anything), and
    unpacked layer directories for layers that were pulled in full. Whiteouts (``.wh.x``
    in eStargz, a 0/0 character device in an unpacked directory) delete lower entries,
    opaque directories (``.wh..wh..opq``, or the ``trusted.overlay.opaque`` xattr) hide
    lower contents. Hard links share one inode; device nodes are metadata only (the
    mount is ``nodev``). Since an image never changes, every attribute, directory entry,
    negative lookup and page of file data is cached by the kernel for a day.

Where bytes come from
    A file's chunks are fetched on first read with HTTP Range requests (the missed
    chunks plus a little read-ahead in blob order, adjacent ranges merged), verified
    against their ``chunkDigest`` and stored in a chunk cache on disk keyed by that
    digest, which every mount and image shares. Concurrent reads of one chunk fetch it
    once. Before the mount is announced ready the prioritized files (before the
    ``.prefetch.landmark``) are fetched in one request; afterwards, the rest is fetched
    in the background, yielding to foreground reads.

What it never does
    Return bytes that failed verification, or bytes of a fetch that failed: the read
    answers EIO and one log line says which file, which blob and why.

The modules, bottom up. All but the last three import neither pyfuse3 nor trio (a unit
test checks), so they are tested without root or FUSE; importing this package imports
nothing.

    sources   the seam to a layer blob's bytes: a registry blob, a file on disk
    chunks    the chunk cache on disk, and the key a chunk is cached under
    stats     the counters the daemon publishes for the worker
    layers    one layer's entries: an eStargz TOC, or an unpacked directory
    tree      the merge of the layer stack into inodes, and their attributes
    planning  which chunks a read, the prefetch and the background fetch ask for
    loading   a spec's layers built: TOCs fetched (their tail kept), verified, indexed
    fetcher   (trio) fetch, verify and cache chunks: on demand, at mount, background
    fs        (pyfuse3) the FUSE operations over the tree
    daemon    (both) one mount's life, and ``main``
"""
