"""Dataset exports: one activation array or feature table (or a subset of it) as Parquet, Hugging Face datasets,
NumPy or safetensors shards, with a manifest, published atomically.

    export_activations(store, harvest_id, "blocks.6.hook_resid_post", "out/l6", "parquet", split="train")
    export_features(table_dir, "out/f17", "safetensors", features=[17])
    verify_export("out/l6")                                   # re-read every shard; checksums too

An export directory (file names depend only on the request, so a re-run writes the same names):

    parquet      part-00000.parquet ...      columns tok, act (FixedSizeList<float>[d]) [+ token columns]
    datasets     data-00000-of-0000N.arrow, state.json, dataset_info.json: `datasets.load_from_disk(dir)`
    npy          act-00000.npy, tok-00000.npy ...  one file per column per shard, `np.load(f, mmap_mode="r")`
    safetensors  shard-00000.safetensors ...  tensors tok, act [+ token columns], `safetensors.safe_open`
    manifest.json  kind `export`: the request (source ids, site, subset, format), row count, dtypes, and every
                   shard with its row range, files, bytes and sha256; written last

Feature tables export the columns feature, tok, value instead of tok, act. Every shard but the last holds
exactly `shard_rows` rows (default: about DEFAULT_SHARD_BYTES); rows keep the source order (`tok` order for
activations, the chosen copy's order for feature tables).

dtypes. Values keep their stored bits: float32 and float16 stay as they are. bfloat16 stays bfloat16 in
safetensors, which has the type; Arrow, Parquet, datasets and NumPy have none, so there it is widened to float32,
which is exact (`x.to(torch.bfloat16)` gives the stored bits back) and readable by every consumer without a
convention about uint16 bit patterns. The logical dtype is kept in the manifest (`extra.logical_dtype`), the
Parquet/Arrow key-value metadata (`actstore`) and the safetensors `__metadata__`. Token columns are doc, seq, pos,
token_id (TOKEN_SCHEMA types) and split: a string in Parquet/datasets, int8 codes into SPLITS in npy/safetensors.

Subsets: `rows=(start, stop)` keeps toks in [start, stop); `split` keeps `train` or `holdout` tokens; `where` is a
polars expression (or SQL string, `"pos > 0 AND doc < 100"`) on the token table, evaluated on a window of token
rows at a time, so it must be row-wise (comparisons, `is_in`, arithmetic), not an aggregation; `features` keeps
those latents of a feature table.

Memory: the stream is read one chunk at a time (`chunk_tokens` rows of an array, one Parquet batch of a feature
table) and written chunk by chunk (table formats gather up to BLOCK_BYTES per row group); array formats are
pre-sized, which needs the kept row count first, so a filtered npy/safetensors export reads the filter inputs
twice (the token table, or a feature table's feature and tok columns).
The datasets format stages Arrow files and lets `Dataset.save_to_disk` (which reads them memory-mapped) write
the final shards, so its data is written twice.

Exactly once: the export is built in a staged sibling directory, verified by reading every shard back (rows,
columns, dtypes, shapes), checksummed, given its manifest and renamed into place. Running the same export again
finds the manifest, checks the shards' headers and returns without writing; a directory holding something else
is refused.
"""

from actstore.store.exports.columns import FORMATS, TOKEN_COLUMNS, ExportResult
from actstore.store.exports.requests import export_activations, export_features, token_predicate
from actstore.store.exports.verify import verify_export

__all__ = [
    "FORMATS",
    "TOKEN_COLUMNS",
    "ExportResult",
    "export_activations",
    "export_features",
    "token_predicate",
    "verify_export",
]
