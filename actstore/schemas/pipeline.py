"""One pipeline config file (YAML or TOML): ingest -> harvest -> train -> encode -> eval -> dashboard.

Every section reuses the config of the step it drives, so a pipeline's objects get the same ids as the same
steps run one command at a time. Unknown fields, wrong types and bad values fail on load with the dotted
path of the field (`harvest.sites`, `train.k`), before any work starts.
"""

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalSplit
from actstore.schemas.features import ValueDtype
from actstore.schemas.harvest import StoreDtype
from actstore.schemas.model import ModelConfig
from actstore.schemas.train import TrainConfig

DEFAULT_STORE = "./actstore-data"


class HarvestStep(BaseModel):
    """Which activations to store; the corpus and model come from their own sections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: tuple[str, ...] = Field(min_length=1)
    """Site names (`blocks.6.hook_resid_post`, raw module paths); one SAE is trained per site."""
    loss: bool = True
    """Also store per-token next-token loss (what eval's and forecast's loss numbers read)."""
    store_dtype: StoreDtype = "model"
    """Dtype on disk; `model` keeps the model's own."""
    batch_windows: int | None = Field(default=None, gt=0)
    """Windows per forward batch = per chunk; default fills ~4096 tokens."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Harvest only the first tokens of the corpus."""


class TrainStep(TrainConfig):
    """An SAE per harvest site: every `TrainConfig` field, plus the checkpoint interval."""

    checkpoint_every: int = Field(default=100, gt=0)
    """Steps between checkpoints (a killed training resumes from the last one)."""

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(exclude={"checkpoint_every"}))


class EncodeStep(BaseModel):
    """How the trained SAEs' latents are stored in the sparse-feature store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value_dtype: ValueDtype = "float16"
    """Dtype of stored activation values."""


class EvalStep(BaseModel):
    """`EvalConfig` less the SAE, harvest and site, which the pipeline fills in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: EvalSplit = "holdout"
    """Tokens evaluated: the corpus's holdout documents by default."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Evaluate at most this many tokens of the split."""
    exclude_bos: bool = True
    """Leave position 0 out of every mean."""
    outlier_factor: float | None = Field(default=None, gt=1)
    """Also leave out tokens whose norm exceeds this factor x the median norm."""
    ce_tokens: int = Field(default=4096, ge=0)
    """Tokens of spliced-SAE downstream loss (0 skips the model forward)."""
    histogram_bins: int = Field(default=50, gt=0)
    """Bins of the log-density histogram."""


class DashboardStep(BaseModel):
    """The static feature dashboard of each SAE on its harvest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    logits: bool = True
    """Add each feature's promoted / suppressed tokens (loads the model's unembedding)."""


class RunSettings(BaseModel):
    """Where and how the pipeline runs; none of it changes what is stored, so none of it is in any id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu; or any torch device string."""
    threads: int | None = Field(default=None, gt=0)
    """torch CPU threads per task; Dask workers start with 1, so set it for CPU work on a cluster."""
    shard_chunks: int | None = Field(default=None, gt=0)
    """Chunks per harvest / encode task; default splits each step into 4 tasks per worker."""
    retries: int = Field(default=2, ge=0)
    """Retries of a failed shard task (a lost worker, a flaky filesystem); bad input is never retried."""
    retry_delay_seconds: float = Field(default=5.0, ge=0)
    """Wait before a retry."""
    gpu_concurrency: int | None = Field(default=None, gt=0)
    """Prefect concurrency limit on tasks tagged `gpu` (model forwards on cuda); set when a server is used."""
    dask_address: str | None = None
    """Scheduler of an existing Dask cluster (`tcp://host:8786`); `--dask` overrides it."""
    workers: int | None = Field(default=None, gt=0)
    """Start a local Dask cluster of this many single-threaded worker processes; `--workers` overrides it."""
    progress: bool = True
    """Progress bars on the terminal (Prefect progress artifacts are written either way)."""


class Schedule(BaseModel):
    """When `actstore serve` runs the pipeline: one of an interval or a cron expression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_seconds: float | None = Field(default=None, gt=0)
    cron: str | None = None
    """Standard five-field cron, e.g. `0 3 * * *` (03:00 every day)."""
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_of(self) -> "Schedule":
        if (self.interval_seconds is None) == (self.cron is None):
            raise ValueError("give exactly one of interval_seconds and cron")
        return self


class PipelineConfig(BaseModel):
    """The whole job. Sections left out are steps not run: no `train` means harvest only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Deployment and artifact name."""
    store: str = DEFAULT_STORE
    """Store root: a directory (relative to the config file) or an fsspec URL (`s3://bucket/prefix`)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model every step runs; the corpus is tokenized with its tokenizer unless `corpus.tokenizer` says."""
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    """What to ingest (`source`, `paths` or `hf_name`, `ctx_len`, `max_tokens`, ...)."""
    harvest: HarvestStep
    train: TrainStep | None = None
    encode: EncodeStep | None = Field(default_factory=EncodeStep)
    """Encode each harvest with its SAE (needs `train`); `null` skips it."""
    eval: EvalStep | None = Field(default_factory=EvalStep)
    """Evaluate each SAE (needs `train`); `null` skips it."""
    dashboard: DashboardStep | None = Field(default_factory=DashboardStep)
    """Feature dashboard per SAE (needs `train` and `encode`); `null` skips it."""
    run: RunSettings = Field(default_factory=RunSettings)
    schedule: Schedule | None = None
    """Used by `actstore serve` and `infra/prefect.yaml`."""

    @model_validator(mode="before")
    @classmethod
    def _corpus_tokenizer_from_model(cls, data: Any) -> Any:
        """The corpus is tokenized by the pipeline's model unless it names another tokenizer."""
        if isinstance(data, dict) and isinstance(data.get("corpus", {}), dict):
            model = data.get("model") or {}
            if isinstance(model, dict):
                tokenizer = {k: model[k] for k in ("name", "revision", "trust_remote_code", "tokenizer") if k in model}
                data = {**data, "corpus": {"tokenizer": tokenizer, **data.get("corpus", {})}}
        return data

    @model_validator(mode="after")
    def _steps_need_training(self) -> "PipelineConfig":
        if self.train is None and self.dashboard is not None and "dashboard" in self.model_fields_set:
            raise ValueError("dashboard needs a train section (the dashboard shows an SAE's features)")
        if self.dashboard is not None and self.encode is None and self.train is not None:
            raise ValueError("dashboard needs the encode step: drop `encode: null` or set `dashboard: null`")
        return self


def resolve_store(config: PipelineConfig, config_path: Path) -> str:
    """A relative store directory is taken from the config file's folder, wherever the command runs."""
    if "://" in config.store:
        return config.store
    root = Path(config.store).expanduser()
    return str(root if root.is_absolute() else (config_path.parent / root).resolve())


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a `.yaml` / `.yml` / `.toml` pipeline file; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline config {path} does not exist: pass the path of a .yaml or .toml file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise UserError(f"pipeline config {path} is neither .yaml/.yml nor .toml: rename it")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise UserError(
            f"pipeline config {path} is not valid {path.suffix[1:].upper()}: {' '.join(str(err).split())}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"pipeline config {path} must be a mapping of sections (model, corpus, harvest, ...)")
    for key, value in (overrides or {}).items():
        data = _set_dotted(data, key, value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"pipeline config {path}: {describe_error(exc)}") from None


def describe_error(exc: ValidationError) -> str:
    """The first validation error as `field.path: what is wrong (got VALUE)`, with the allowed fields of a
    section when the field is unknown."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"] if not _is_type_tag(str(part))]
    field = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = f": allowed fields are {', '.join(allowed)}" if allowed else ""
        return f"{field}: unknown field{hint}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) or error["type"] == "missing" else f" (got {got!r})"
    return f"{field}: {message}{shown}"


def _is_type_tag(part: str) -> bool:
    """Pydantic puts the tried union member (`int`, `float`, `function-after[...]`) into error locations."""
    return part in ("int", "float", "str", "bool", "none") or "[" in part


def _allowed_fields(section: list[str]) -> list[str]:
    """Field names of the model at a dotted location, for the unknown-field hint."""
    model: type[BaseModel] = PipelineConfig
    for part in section:
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = next((t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _types(annotation: Any) -> list[Any]:
    return list(getattr(annotation, "__args__", ())) or [annotation]


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`run.workers=2`-style override of one field."""
    head, _, rest = key.partition(".")
    if not rest:
        return {**data, head: value}
    inner = data.get(head) or {}
    if not isinstance(inner, dict):
        raise UserError(f"cannot override {key}: {head} is not a section")
    return {**data, head: _set_dotted(inner, rest, value)}
