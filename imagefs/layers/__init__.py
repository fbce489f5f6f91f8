"""The files inside layers: what ``layer-…/fs/`` and ``manifest-…/rootfs/`` show.

- :mod:`.entries` — :class:`Entry` (one tar member's metadata and where its bytes are) and
  :class:`LayerIndex`, persisted versioned in ``CACHE/indexes/sha256/<hex>.v3``.
- :mod:`.tarindex` — one streaming pass over a layer's uncompressed tar builds its entries;
  names are normalised, escaping names refused, duplicates resolved (the last wins).
- :mod:`.zran` — random access into gzip layers: inflate checkpoints (``indexed_gzip``) and a
  sha256 per compressed span, so a read fetches and verifies only the spans it needs.
- :mod:`.merge` — applies layers in order with OCI whiteouts: the tree a view lists.
- :mod:`.diffids` — a layer's uncompressed digest against its config's ``rootfs.diff_ids``.
- :mod:`.service` — :class:`Layers`: builds or loads indexes once per layer, reads file bytes.
- :mod:`.lazy`, :mod:`.toc`, :mod:`.estargz`, :mod:`.zstdchunked` — layers with their own TOC
  (eStargz, zstd:chunked): listed from the TOC alone, read chunk by chunk, every chunk verified.
"""
