"""`actstore direction`: the difference in means of a site's activations between two token sets of a harvest,
stored so harvests (and anything that splices) can ablate or add it.

The story: `label_tokens` turns the two SQL filters into per-token labels from the token table, `average` streams
the chunks through a float64 `DiffInMeans`, and the direction is published with its manifest in a staged
directory. `intervention_replacements` turns a harvest's interventions into splice replacements."""

from typing import Any

import numpy as np
import polars as pl
import torch
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from actstore.flows.runtime import flow, task
from actstore.schemas.directions import DIRECTION_FILE, DirectionConfig, Intervention
from actstore.schemas.errors import UserError
from actstore.schemas.manifest import Manifest
from actstore.store.activations import chunk_rows
from actstore.store.exports import token_predicate
from actstore.store.root import Store
from actstore.transforms.directions import DiffInMeans, activation_addition, directional_ablation
from actstore.transforms.splice import Replacement


def _labels(store: Store, config: DirectionConfig, n_tokens: int, corpus_id: str) -> np.ndarray:
    """Per token: 1 positive, 0 negative, -1 neither (int8); refuses overlapping or empty sets."""
    split = None if config.split == "all" else config.split
    tokens = store.tokens(corpus_id).filter(pl.col("tok") < n_tokens)
    labels = np.full(n_tokens, -1, dtype=np.int8)
    for value, where in ((1, config.positive), (0, config.negative)):
        predicate = token_predicate(split, where)
        toks = tokens.filter(predicate).select("tok").collect()["tok"].to_numpy()
        if len(toks) == 0:
            raise UserError(
                f"the {'positive' if value else 'negative'} set {where!r} selects no {config.split} "
                f"token of {config.harvest_id}: loosen the filter"
            )
        if value == 0 and (labels[toks] == 1).any():
            raise UserError(
                f"filters {config.positive!r} and {config.negative!r} both select tok "
                f"{int(toks[labels[toks] == 1][0])}: make the two sets disjoint"
            )
        labels[toks] = value
    return labels


@task(name="average-sets")
def average(store_root: str, config: DirectionConfig) -> dict[str, Any]:
    """Stream the site's chunks; float64 sums of each labelled set."""
    store = Store(store_root)
    harvest = store.manifest("harvest", config.harvest_id)
    acts = store.activations(config.harvest_id, config.site)
    labels = _labels(store, config, len(acts), harvest.extra["corpus_id"])
    means = DiffInMeans(acts.attrs.d)
    for chunk in range(-(-len(acts) // acts.chunk_tokens)):
        rows = chunk_rows(chunk, acts.chunk_tokens, len(acts))
        chosen = np.flatnonzero(labels[rows] >= 0)
        if len(chosen):
            x = torch.as_tensor(acts[rows])[chosen].to(torch.float64)
            means.update(x, torch.from_numpy(labels[rows][chosen].astype(np.int64)))
    return {
        "direction": means.direction,
        "unit": means.unit,
        "mean_positive": means.mean_positive,
        "mean_negative": means.mean_negative,
        "mean": means.mean,
        "counts": {"positive": int(means.counts[1]), "negative": int(means.counts[0])},
    }


@task(name="publish-direction", cache_policy=NO_CACHE)
def publish_direction(store_root: str, config: DirectionConfig, found: dict[str, Any]) -> Manifest:
    """Store the direction's vectors (safetensors) and publish them."""
    with Store(store_root).object("direction", config.direction_id()).publish(config) as pub:
        vectors = {k: v.to(torch.float32).contiguous() for k, v in found.items() if k != "counts"}
        save_file(vectors, str(pub.directory / DIRECTION_FILE))
        pub.counts = found["counts"]
        pub.extra = {"norm": float(found["direction"].norm()), "d": int(found["direction"].numel())}
    return pub.manifest


@flow(name="direction")
def direction(store_root: str, config: DirectionConfig) -> Manifest:
    """Two token sets of a harvest site -> their difference-in-means direction; a finished one is returned."""
    existing = Store(store_root).published("direction", config.direction_id())
    if existing is not None:
        return existing
    found = average(store_root, config)
    return publish_direction(store_root, config, found)


def load_direction(store: Store, direction_id: str) -> dict[str, torch.Tensor]:
    """The stored vectors of a direction (safetensors, never pickle)."""
    store.manifest("direction", direction_id)
    return load_file(str(store.direction_dir(direction_id) / DIRECTION_FILE))


def intervention_replacements(
    store: Store, interventions: tuple[Intervention, ...], widths: dict[str, int]
) -> dict[str, Replacement]:
    """Site -> replacement for a splice; several interventions at one site apply in the order given."""
    chains: dict[str, list[Replacement]] = {}
    for item in interventions:
        vectors = load_direction(store, item.direction_id)
        r = vectors["direction"]
        fn = directional_ablation(r) if item.kind == "ablate" else activation_addition(r, item.alpha)
        for site in item.sites:
            if widths.get(site, r.numel()) != r.numel():
                raise UserError(
                    f"direction {item.direction_id} has width {r.numel()} but site {site} has "
                    f"{widths[site]}: use a direction of that site's width"
                )
            chains.setdefault(site, []).append(fn)

    def compose(fns: list[Replacement]) -> Replacement:
        def apply(x: torch.Tensor) -> torch.Tensor:
            for fn in fns:
                x = fn(x)
            return x

        return apply

    return {site: compose(fns) for site, fns in chains.items()}
