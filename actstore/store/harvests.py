"""What a finished harvest's manifest says: the model it ran and the sites it stored.

Every step downstream of a harvest (train, encode, eval, attribute, transfer, the dashboard, the CLI) asks
these questions of the same manifest, so the answers live here, beside the store that holds it.
"""

from actstore.schemas.errors import NotFoundError
from actstore.schemas.harvest import GRADIENT_SUFFIX, gradient_array
from actstore.schemas.manifest import Manifest
from actstore.schemas.model import ModelConfig
from actstore.store.activations import LOSS_SITE


def harvest_model(harvest: Manifest) -> ModelConfig:
    """The model a harvest ran (its control included); synthetic harvests name their generator."""
    return ModelConfig.model_validate(harvest.config["model"])


def harvest_model_label(harvest: Manifest) -> str:
    """What SAEs trained on this harvest record as their model, so a control's SAE is never taken for the
    trained model's: `smollm2-135m`, `smollm2-135m+reinit-s0`, `synthetic:gaussian_mixture`."""
    return harvest_model(harvest).label()


def activation_sites(harvest: Manifest) -> list[str]:
    """The sites a harvest stored activations of: its arrays less the loss and the gradient arrays."""
    return [s for s in harvest.extra["arrays"] if s != LOSS_SITE and not s.endswith(GRADIENT_SUFFIX)]


def choose_site(harvest: Manifest, site: str | None, hook: str | None, *, gradients: bool = False) -> str:
    """The site an SAE is applied to: as given, else the SAE's recorded `hook`, else the harvest's only site.

    `gradients`: choose among the sites whose gradients the harvest stored (attribution), not all its sites."""
    arrays = harvest.extra["arrays"]
    sites = [s for s in arrays if gradient_array(s) in arrays] if gradients else activation_sites(harvest)
    held = f"gradients at {', '.join(sites)}" if gradients else f"sites {', '.join(sites)}"
    if site is not None:
        if site not in sites:
            fix = "re-harvest that site with --gradients" if gradients else "harvest that site"
            missing = f"not at {site!r}" if gradients else f"not {site!r}"
            raise NotFoundError(f"harvest {harvest.id} has {held}, {missing}: pass --site with one of them, or {fix}")
        return site
    if hook in sites:
        return str(hook)
    if len(sites) == 1:
        return sites[0]
    raise NotFoundError(f"harvest {harvest.id} has {held} and the SAE records none of them: pass --site")
