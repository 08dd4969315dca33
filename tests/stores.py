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


def random_photo_samples(n: int, datas: list[bytes], hws: list, *, seed: int, max_len: int,
                         trained_from: int, text_only_every: int, sources: int = 1):
    """``n`` random samples and their image bytes: BOS then random tokens (20 to ``max_len``),
    trained from ``1/trained_from`` of the way on; every ``text_only_every``-th sample has no
    image, the others the test photos in turn; sample ``i`` comes from source ``i % sources``."""
    import numpy as np

    from megatron_sphinx.data.layout import Sample

    rng = np.random.default_rng(seed)
    samples, images = [], []
    for i in range(n):
        k = int(rng.integers(20, max_len))
        ids = rng.integers(3, 500, k).astype(np.int32)
        ids[0] = 1
        mask = np.arange(k) >= k // trained_from
        photo = i % text_only_every != text_only_every - 1
        j = i % len(datas)
        samples.append(Sample(ids, mask, hws[j] if photo else None, 1, i % sources))
        images.append(datas[j] if photo else None)
    return samples, images
