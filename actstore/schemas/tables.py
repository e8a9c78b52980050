"""Arrow schemas of the tables in the store; every table joins on `tok`."""

import pyarrow as pa

TOKEN_SCHEMA = pa.schema(
    [
        pa.field("tok", pa.int64(), nullable=False),  # global token index = seq * ctx_len + pos
        pa.field("doc", pa.int64(), nullable=False),  # document index in corpus order
        pa.field("seq", pa.int64(), nullable=False),  # window index
        pa.field("pos", pa.int32(), nullable=False),  # position in the window
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("split", pa.dictionary(pa.int8(), pa.string()), nullable=False),  # "train" | "holdout"
    ]
)
"""Token table (`store/corpora/<corpus_id>/part-*.parquet`), sorted by `tok`, contiguous from 0."""

SPLITS = ("train", "holdout")
