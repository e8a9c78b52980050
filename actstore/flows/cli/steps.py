"""The step commands: `ingest`, `harvest`, `train`, `encode`. Their options come from the configs they build.

A command whose object already exists answers from the store's manifest without importing its flow (and with
it Prefect, transformers and the model): re-running a finished step costs what listing the store costs.
"""

import argparse
from typing import Any

from actstore.flows.cli.options import ConfigOptions, add_field, add_sae_on_harvest, build
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.encode import EncodeConfig, EncodeRuntime
from actstore.schemas.errors import ConfigError
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.manifest import Manifest
from actstore.schemas.model import ModelConfig, ModelControl
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.store.root import Store

CORPUS = ConfigOptions(
    CorpusConfig,
    exclude=("tokenizer",),
    flags={"paths": "path", "holdout_fraction": "holdout"},
    negated={"add_bos": "no-bos"},
)
HARVEST = ConfigOptions(
    HarvestConfig,
    exclude=("model", "interventions"),
    flags={"corpus_id": "corpus", "sites": "site", "gradient_metric": "gradients", "logit_diff_tokens": "logit-diff"},
)
HARVEST_RUNTIME = ConfigOptions(HarvestRuntime, negated={"progress": "no-progress"})
MODEL = ConfigOptions(
    ModelConfig, exclude=("name", "control"), flags={"dtype": "model_dtype", "revision": "model_revision"}
)
CONTROL = ConfigOptions(
    ModelControl,
    flags={
        "kind": "control",
        "seed": "control_seed",
        "scale": "control_scale",
        "keep_embeddings": "control_keep_embeddings",
    },
    optional=("kind",),
)
TRAIN = ConfigOptions(
    TrainConfig,
    flags={"total_tokens": "tokens", "l1_coefficient": "l1", "l0_coefficient": "l0"},
    # the CLI trains a quick SAE by default; a pipeline config states its run in full
    defaults={"total_tokens": 2_000_000, "warmup_steps": 100},
)
TRAIN_RUN = ConfigOptions(TrainRun, exclude=("train",), flags={"harvest_id": "harvest"})
ENCODE = ConfigOptions(EncodeConfig, fields=("value_dtype",))
ENCODE_RUNTIME = ConfigOptions(EncodeRuntime, negated={"progress": "no-progress"})


def add_ingest_args(p: argparse.ArgumentParser) -> None:
    CORPUS.add_to(p)
    add_field(p, ModelConfig, "name", "model")


def cmd_ingest(a: argparse.Namespace) -> dict[str, Any]:
    config = CORPUS.build(a, tokenizer=ModelConfig(name=a.name))
    manifest = Store(a.store).published("corpus", config.corpus_id())
    if manifest is None:
        from actstore.flows.ingest import ingest

        manifest = ingest(a.store, config)
    return {"corpus_id": manifest.id, **manifest.counts}


def add_harvest_args(p: argparse.ArgumentParser) -> None:
    HARVEST.add_to(p)
    p.add_argument("--model", help="hub id, local dir, .gguf or smollm2-135m (default: the corpus tokenizer's)")
    MODEL.add_to(p)
    CONTROL.add_to(p)
    p.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="DIRECTION_ID@SITE[,SITE]",
        help="ablate a direction (actstore direction) at sites during the forward (repeatable)",
    )
    p.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="DIRECTION_ID@SITE[,SITE]:ALPHA",
        help="add alpha x a direction at sites during the forward (repeatable)",
    )
    HARVEST_RUNTIME.add_to(p)


def harvest_config(a: argparse.Namespace) -> HarvestConfig:
    """The harvest the flags describe; without `--model`, the model whose tokenizer made the corpus."""
    control = CONTROL.build(a) if a.kind is not None else None
    if control is None and (a.scale is not None or a.keep_embeddings):
        raise ConfigError("--control-scale and --control-keep-embeddings need --control reinit|permute|perturb")
    if a.model:
        model = MODEL.build(a, name=a.model, control=control)
    else:
        tokenizer = Store(a.store).manifest("corpus", a.corpus_id).config["tokenizer"]
        model = build(ModelConfig, {**tokenizer, **MODEL.values(a), "control": control}, MODEL.flag)
    interventions = tuple(parse_intervention(kind, text) for kind in ("ablate", "add") for text in getattr(a, kind))
    return HARVEST.build(a, model=model, interventions=interventions)


def parse_intervention(kind: str, text: str) -> Any:
    """`DIRECTION_ID@SITE[,SITE]` (ablate) or `DIRECTION_ID@SITE[,SITE]:ALPHA` (add)."""
    from actstore.schemas.directions import Intervention

    form = "DIRECTION_ID@SITE[,SITE]" + (":ALPHA" if kind == "add" else "")
    head, _, alpha = text.rpartition(":") if kind == "add" else (text, "", "")
    direction_id, _, sites = head.partition("@")
    try:
        value = float(alpha) if kind == "add" else 1.0
    except ValueError:
        value = None
    if not direction_id or not sites or value is None:
        raise ConfigError(
            f"--{kind} {text!r} is not {form}: e.g. --{kind} direction-L6-1a2b3c4d@blocks.6.hook_resid_post"
            + (":4.0" if kind == "add" else "")
        )
    return Intervention(kind=kind, direction_id=direction_id, sites=tuple(sites.split(",")), alpha=value)


def cmd_harvest(a: argparse.Namespace) -> dict[str, Any]:
    config = harvest_config(a)
    manifest = Store(a.store).published("harvest", config.harvest_id())
    if manifest is None:
        from actstore.flows.harvest import harvest

        manifest = harvest(a.store, config, HARVEST_RUNTIME.build(a))
    return {
        "harvest_id": manifest.id,
        "n_tokens": manifest.counts["n_tokens"],
        "sites": list(manifest.extra["arrays"]),
        "tokens_per_s": manifest.timings.get("tokens_per_s"),
        "device": manifest.extra.get("device"),
    }


def add_train_args(p: argparse.ArgumentParser) -> None:
    TRAIN_RUN.add_to(p)
    TRAIN.add_to(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def train_run(a: argparse.Namespace) -> TrainRun:
    """The run the flags describe: 4 latents per input dimension unless `--d-sae` or `--expansion-factor` says
    otherwise, and `--k` only for the architectures that take one (an integer for topk)."""
    values = TRAIN.values(a)
    if values.get("d_sae") is None and values.get("expansion_factor") is None:
        values["expansion_factor"] = 4
    if a.architecture in ("jumprelu", "standard"):
        values.pop("k", None)
    elif values.get("k") is None:
        values["k"] = 32
    if a.architecture == "topk" and float(values["k"]).is_integer():
        values["k"] = int(values["k"])
    train = build(TrainConfig, values, TRAIN.flag)
    return TRAIN_RUN.build(a, train=train)


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    run = train_run(a)
    from actstore.flows.train import train

    manifest = train(a.store, run, progress=a.progress)
    return {
        "sae_id": manifest.id,
        **manifest.counts,
        **manifest.extra["eval_holdout"],
        "path": str(Store(a.store).sae_dir(manifest.id)),
    }


def add_encode_args(p: argparse.ArgumentParser) -> None:
    add_sae_on_harvest(p)
    ENCODE.add_to(p)
    ENCODE_RUNTIME.add_to(p)


def _features_summary(store: Store, manifest: Manifest) -> dict[str, Any]:
    sae_id, harvest_id = manifest.id.split("/")
    path = store.root / "features" / sae_id / harvest_id
    return {
        "sae_id": sae_id,
        "harvest_id": harvest_id,
        "site": manifest.extra["site"],
        **manifest.counts,
        "path": str(path),
    }


def cmd_encode(a: argparse.Namespace) -> dict[str, Any]:
    store = Store(a.store)
    if a.sae.startswith("sae-") and a.site is None:  # a stored SAE already encoded: nothing to load
        manifest = store.published("features", f"{a.sae}/{a.harvest}")
        if manifest is not None and manifest.config == {**manifest.config, **ENCODE.values(a)}:
            return _features_summary(store, manifest)
    from actstore.flows.encode import encode

    manifest = encode(a.store, a.sae, a.harvest, a.site, a.value_dtype, ENCODE_RUNTIME.build(a))
    return _features_summary(store, manifest)
