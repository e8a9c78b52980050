"""The store: one root directory (or fsspec URL) holding corpora, activations, SAEs and features."""
