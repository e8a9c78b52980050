"""Content-hash ids: the same normalized config always gives the same id, so a re-run resumes."""

import hashlib
import json
import re
from typing import Any, ClassVar

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

ID_HASH_CHARS = 8


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the normal form that ids hash."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_hash(value: Any, chars: int = ID_HASH_CHARS) -> str:
    """Short hex sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:chars]


def slug(text: str, max_len: int = 40) -> str:
    """A filesystem- and URL-safe readable fragment for id prefixes (`SmolLM2-135M` -> `smollm2-135m`)."""
    text = re.sub(r"\.gguf$", "", text.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:max_len].strip("-") or "x"


def make_id(kind: str, readable: str, config: BaseModel | dict[str, Any]) -> str:
    """`<kind>-<readable>-<hash>`, e.g. `harvest-smollm2-135m-L6-3f9a1c2e`."""
    return f"{kind}-{readable}-{content_hash(config)}"


class OmitsDefaults(BaseModel):
    """A config whose `omitted_at_default` fields are left out of its dump while they hold their default.

    Ids hash the dump, and manifests and Zarr attributes store it, so a field added later with a default keeps
    every object made before it with the same id and the same bytes: what an old run wrote is what a new run
    with the field at its default writes. Set to anything else, the field is dumped and hashed as usual."""

    omitted_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        for name in self.omitted_at_default:
            if getattr(self, name) == fields[name].get_default(call_default_factory=True):
                data.pop(name, None)
        return data
