"""SAEs in the store: a checkpoint from anywhere (SAELens, sparsify, Gemma Scope, ours) is imported once into
`store/saes/<sae_id>/` in SAELens' layout, under an id that hashes its weights; everything downstream uses the id."""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from actstore.schemas.ids import make_id, slug
from actstore.schemas.manifest import Manifest
from actstore.schemas.sae import SAELENS_CFG, SAELENS_WEIGHTS
from actstore.store.activations import ActivationArray
from actstore.store.files import TMP_MARK, explain_os_error
from actstore.store.harvests import harvest_model_label
from actstore.store.root import Store
from actstore.transforms.sae import SAE, check_compatible, load, save


def sae_readable(sae: SAE) -> str:
    hook = slug(sae.hook_name.replace("hook_", "").replace("blocks.", "L"), 24) if sae.hook_name else "any"
    return f"{sae.architecture}-{sae.d_sae}-{hook}"


def weights_digest(directory: Path) -> str:
    """sha256 over the saved weights and config: two checkpoints with the same bytes get the same id."""
    digest = hashlib.sha256()
    for name in (SAELENS_WEIGHTS, SAELENS_CFG):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def publish_sae(store_root: str, sae: SAE, source: str, extra: dict | None = None) -> Manifest:
    """Save `sae` into the store under its content id (a no-op when those bytes are already there).

    The id hashes the saved bytes, so the checkpoint is first written to a scratch directory of the store."""
    store = Store(store_root)
    base = store.root / "saes"
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=TMP_MARK, dir=base) as scratch:
            save(sae, Path(scratch))
            stored = store.object("sae", make_id("sae", sae_readable(sae), {"weights": weights_digest(Path(scratch))}))
            existing = stored.published()
            if existing is not None:
                return existing
            with stored.publish(sae.config) as pub:
                for file in Path(scratch).iterdir():
                    os.replace(file, pub.directory / file.name)
                pub.counts = {"d_in": sae.d_in, "d_sae": sae.d_sae}
                pub.extra = {"source": source, **(extra or {})}
            return pub.manifest
    except OSError as exc:
        raise explain_os_error(exc, base) from exc


def open_sae(store_root: str, sae: str) -> tuple[SAE, str | None]:
    """`sae` is an SAE id of the store or a checkpoint path: the loaded SAE, and its id when it is in the store.

    Commands check a checkpoint against the harvest before importing it, so bad input leaves the store as it was.
    """
    store = Store(store_root)
    if sae.startswith("sae-") and not Path(sae).exists():
        sae_id = store.manifest("sae", sae).id
        return load(store.sae_dir(sae_id)), sae_id
    return load(sae), None


def stored_sae_id(store_root: str, sae: str, model: SAE, known_id: str | None) -> str:
    """The store id of an SAE opened with `open_sae`, importing the checkpoint now if it came from a path."""
    return known_id or publish_sae(store_root, model, source=str(Path(sae).resolve())).id


def sae_on_site(
    store: Store, sae_id: str, harvest_id: str, site: str, device: torch.device, allow_mismatch: bool
) -> tuple[Manifest, ActivationArray, SAE]:
    """A stored SAE on `device` and the harvest site it will read, checked to fit (width, and model and hook
    unless `allow_mismatch`) before any work starts: the harvest manifest, the site's array and the SAE."""
    harvest = store.manifest("harvest", harvest_id)
    acts = store.activations(harvest_id, site)
    sae = load(store.sae_dir(sae_id), device=device)
    check_compatible(sae, acts.attrs.d, site, harvest_model_label(harvest), allow_mismatch)
    return harvest, acts, sae
