"""The store: one root directory holding corpora, activations, SAEs and features.

    import store
    s = store.open("./actstore-data")
    s.tokens(corpus_id).filter(...).collect()
    s.activations(harvest_id, "blocks.6.hook_resid_post")[0:4096]
"""

from store.root import Store, open_store

open = open_store  # `store.open(root)` reads like `zarr.open`

__all__ = ["Store", "open", "open_store"]
