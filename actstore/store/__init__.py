"""The store: one root directory (or object-storage URL) holding corpora, activations, SAEs and features.

import actstore
s = actstore.open("./actstore-data")
s.tokens(corpus_id).filter(...).collect()
s.activations(harvest_id, "blocks.6.hook_resid_post")[0:4096]
"""

from actstore.store.root import Store, open_store

open = open_store  # `actstore.open(root)` reads like `zarr.open`

__all__ = ["Store", "open", "open_store"]
