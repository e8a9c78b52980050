"""Attributes stored on every activation array, so a Zarr reader needs nothing else to interpret it."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

LogicalDtype = Literal["float32", "float16", "bfloat16"]

PHYSICAL_DTYPE: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
"""Zarr has no bfloat16: bf16 is stored as its uint16 bit pattern and read back as bf16."""


class ActivationAttrs(BaseModel):
    """Zarr attributes of `activations/<harvest_id>/<site>.zarr` (and `loss.zarr`, with site `loss`)."""

    model_config = ConfigDict(extra="forbid")

    harvest_id: str
    corpus_id: str
    site: str
    """Site name as requested (`blocks.6.hook_resid_post`) or `loss`."""
    module: str
    """HF module path the site was read from, e.g. `model.layers.6` (output)."""
    model: str
    """Model name as configured."""
    logical_dtype: LogicalDtype
    """The dtype readers get back; the physical Zarr dtype is `PHYSICAL_DTYPE[logical_dtype]`."""
    n_tokens: int
    """Rows; row i is global token `tok = i`."""
    d: int
    """Columns (d_model for residual sites; 1 column is squeezed away for loss)."""
    ctx_len: int
    chunk_tokens: int
    """Rows per chunk = tokens per forward batch."""
