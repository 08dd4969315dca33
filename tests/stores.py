"""Writing an in-memory sample source as a one-shard zarr store (shared by the loader tests)."""
from __future__ import annotations

from megatron_sphinx.data import store


def write_source_store(path, src, source_names, seq_length: int = 4096):
    """``src``'s samples and image bytes (448 px, 2x2 grid) as the store at ``path``; each
    record is keyed ``(source_id, index)``."""
    meta = store.StoreMeta(image_size=448, grid=2, seq_length=seq_length,
                           source_names=list(source_names))
    store.create_store(path, meta)
    w = store.ShardWriter(path, 0, 448, 2)
    for k, (smp, img) in enumerate(zip(src.samples, src.images)):
        w.add(smp, img, (smp.source_id, k))
    w.close()
    return store.write_index(path, meta)
