"""The store root and its layout: where every object lives, and read access to finished ones."""

import json
from pathlib import Path
from typing import NamedTuple

import polars as pl

from schemas.attribution import ATTRIBUTION_DIR
from schemas.errors import UserError
from schemas.eval_tables import EVAL_SUMMARY_SCHEMA, TRANSFER_SUMMARY_SCHEMA
from schemas.manifest import MANIFEST_NAME, Manifest
from store.activations import ActivationArray, open_activation
from store.evals import scan_results
from store.feature_queries import Decode, Encode, FeatureQueries
from store.objects import TMP_MARK, read_manifest

DEFAULT_ROOT = "./actstore-data"
KIND_DIRS = {"corpus": "corpora", "harvest": "activations", "sae": "saes", "eval": "evals",
             "transfer": "transfers", "forecast": "forecasts", "direction": "directions"}


class Listing(NamedTuple):
    """One object of the store, finished or not."""

    kind: str
    id: str
    complete: bool
    """True when its manifest exists."""
    counts: dict[str, int]
    created: str


class Store:
    """A store root on local disk; see DESIGN.md for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def object_dir(self, kind: str, object_id: str) -> Path:
        return self.root / KIND_DIRS[kind] / object_id

    def corpus_dir(self, corpus_id: str) -> Path:
        return self.object_dir("corpus", corpus_id)

    def harvest_dir(self, harvest_id: str) -> Path:
        return self.object_dir("harvest", harvest_id)

    def sae_dir(self, sae_id: str) -> Path:
        return self.object_dir("sae", sae_id)

    def features_dir(self, sae_id: str, harvest_id: str) -> Path:
        return self.root / "features" / sae_id / harvest_id

    def eval_dir(self, eval_id: str) -> Path:
        return self.object_dir("eval", eval_id)

    def direction_dir(self, direction_id: str) -> Path:
        return self.object_dir("direction", direction_id)

    def transfer_dir(self, transfer_id: str) -> Path:
        return self.object_dir("transfer", transfer_id)

    def forecast_dir(self, forecast_id: str) -> Path:
        return self.object_dir("forecast", forecast_id)

    def manifest(self, kind: str, object_id: str) -> Manifest:
        """The manifest of a finished object; a missing or incomplete one is a clear error."""
        directory = self.object_dir(kind, object_id)
        found = read_manifest(directory)
        if found is None:
            if directory.exists():
                raise UserError(f"{kind} {object_id} is incomplete: re-run the command that makes it to resume")
            known = [entry.id for entry in self.ls() if entry.kind == kind and entry.complete]
            hint = f"known: {', '.join(known[:8])}" if known else f"run `actstore {_MAKER[kind]}` first"
            raise UserError(f"no {kind} {object_id!r} in store {self.root}: {hint}")
        return found

    def tokens(self, corpus_id: str) -> pl.LazyFrame:
        """The token table: tok, doc, seq, pos, token_id, split."""
        self.manifest("corpus", corpus_id)
        return pl.scan_parquet(self.corpus_dir(corpus_id) / "part-*.parquet")

    def activations(self, harvest_id: str, site: str) -> ActivationArray:
        """One site's activations (or `loss`), row = tok; slices like numpy."""
        manifest = self.manifest("harvest", harvest_id)
        arrays = list(manifest.extra.get("arrays", {}))
        return open_activation(self.harvest_dir(harvest_id), site, arrays)

    def features(self, sae_id: str, harvest_id: str, decode: Decode | None = None,
                 encode: Encode | None = None) -> FeatureQueries:
        """Queries over an SAE's sparse features on a harvest, joined to that harvest's token table.

        `decode` (token ids -> text) and `encode` (text -> ids) come from the model's tokenizer; the store
        cannot load tokenizers itself, so callers pass them (the CLI does)."""
        harvest = self.manifest("harvest", harvest_id)
        directory = self.features_dir(sae_id, harvest_id)
        if read_manifest(directory) is None:
            state = "is incomplete: re-run the encode to resume it" if directory.exists() else "does not exist"
            raise UserError(f"features of {sae_id} on {harvest_id} {state} (actstore encode)")
        return FeatureQueries(directory, self.tokens(harvest.extra["corpus_id"]), decode, encode)

    def evals(self) -> pl.LazyFrame:
        """One summary row per finished evaluation (ids of the SAE, harvest and site, and every metric)."""
        return scan_results(self.root / KIND_DIRS["eval"], "summary.parquet", EVAL_SUMMARY_SCHEMA)

    def eval_table(self, eval_id: str, table: str) -> pl.LazyFrame:
        """`summary`, `per_token`, `per_feature` or `density_histogram` of one finished evaluation."""
        return self._result_table("eval", eval_id, table)

    def transfers(self) -> pl.LazyFrame:
        """One row per site of every finished transfer analysis: global mean cosine and distance."""
        return scan_results(self.root / KIND_DIRS["transfer"], "summary.parquet", TRANSFER_SUMMARY_SCHEMA)

    def transfer_table(self, transfer_id: str, table: str) -> pl.LazyFrame:
        """`summary`, `per_token`, `per_position`, `histograms`, `sae_transfer` or `feature_transfer`."""
        return self._result_table("transfer", transfer_id, table)

    def forecast_table(self, forecast_id: str, table: str) -> pl.LazyFrame:
        """`runs`, `positions`, `saes`, `fits` or `forecasts` of one finished forecast."""
        return self._result_table("forecast", forecast_id, table)

    def _result_table(self, kind: str, object_id: str, table: str) -> pl.LazyFrame:
        self.manifest(kind, object_id)
        path = self.object_dir(kind, object_id) / f"{table}.parquet"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.parquet"))
            raise UserError(f"{kind} {object_id} has no table {table!r}: choose one of {', '.join(names)}")
        return pl.scan_parquet(path)

    def ls(self) -> list[Listing]:
        """Every object under the root, finished or not (temp directories of live ingests excluded)."""
        found: list[Listing] = []
        for kind, sub in KIND_DIRS.items():
            base = self.root / sub
            if not base.is_dir():
                continue
            for directory in sorted(base.iterdir()):
                if not directory.is_dir() or TMP_MARK in directory.name:
                    continue
                path = directory / MANIFEST_NAME
                if path.exists():
                    data = json.loads(path.read_text())
                    found.append(Listing(kind, directory.name, True, data.get("counts", {}), data.get("created", "")))
                else:
                    found.append(Listing(kind, directory.name, False, {}, ""))
        for directory in sorted((self.root / "features").glob("*/*")):
            if not directory.is_dir() or TMP_MARK in directory.name:
                continue
            object_id = f"{directory.parent.name}/{directory.name}"
            # an attribution lives in its own sub-directory and may exist without an encode of the same pair
            parts = [(kind, path) for kind, path in (("features", directory),
                                                     ("attribution", directory / ATTRIBUTION_DIR)) if path.is_dir()]
            if not any(p.name != ATTRIBUTION_DIR and TMP_MARK not in p.name for p in directory.iterdir()):
                parts = parts[1:]
            for kind, path in parts:
                manifest = read_manifest(path)
                found.append(Listing(kind, object_id, manifest is not None,
                                     manifest.counts if manifest else {}, manifest.created if manifest else ""))
        return found


_MAKER = {"corpus": "ingest", "harvest": "harvest", "sae": "train` or `actstore encode --sae PATH",
          "features": "encode", "eval": "eval", "transfer": "transfer", "forecast": "forecast",
          "direction": "direction"}


def open_store(root: str | Path = DEFAULT_ROOT) -> Store:
    """Open a store root for reading (it need not exist yet: writers create it)."""
    return Store(root)
