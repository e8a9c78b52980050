"""The pipeline from one config file: bad configs fail before any work naming the field; a run stores what the
single-step commands store (checked against HF's own forward); a re-run does no work and Prefect shows every
shard task as Cached; the run leaves markdown and table artifacts."""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId
from prefect.client.schemas.sorting import FlowRunSort
from transformers import AutoModelForCausalLM

from actstore.flows.cli.main import main
from actstore.flows.orchestration.pipeline import pipeline
from actstore.schemas.errors import UserError
from actstore.schemas.pipeline import load_pipeline_config
from actstore.store.root import Store
from tests.helpers import snapshot, stored_data, tiny_pipeline


def _latest_steps_task_states() -> dict[str, list[str]]:
    """Task name -> state names of the most recent `pipeline-steps` flow run (the pipeline's task runner)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline-steps"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[runs[0].id]))
        )
    states: dict[str, list[str]] = {}
    for t in tasks:
        states.setdefault(t.name.rsplit("-", 1)[0], []).append(t.state.name if t.state else "")
    return states


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"harvest": {"sites": ["blocks.1.hook_resid_post"], "sitez": 1}}, "harvest.sitez: unknown field"),
        ({"train": {"k": "many"}}, "train.k: Input should be a valid integer"),
        ({"run": {"workers": [2]}}, "run.workers: Input should be a valid integer"),
        ({"modle": {"name": "x"}}, "modle: unknown field: allowed fields are name, store, model"),
        ({"schedule": {"cron": "0 3 * * *", "interval_seconds": 5}}, "schedule: give exactly one of"),
        ({"model": {"name": "/no/such/model-dir"}}, "model.name '/no/such/model-dir'"),
        ({"harvest": {"sites": ["blocks.9.hook_resid_post"]}}, "harvest.sites: "),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_field(
    tiny: Path, tmp_path: Path, edit: dict[str, Any], field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(tiny.read_text())
    config.update({k: {**config.get(k, {}), **v} if k in ("train", "run") else v for k, v in edit.items()})
    config["store"] = str(tmp_path / "store")
    path = _write(tmp_path / "bad.yaml", yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pipeline config") or err.startswith(f"error: {field.split(':')[0]}")
    assert field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_toml_and_yaml_load_the_same_config(tiny: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(tiny.read_text())
    toml = _write(
        tmp_path / "pipeline.toml",
        f"""
name = "tiny"
store = "store"
[model]
name = "{data["model"]["name"]}"
[corpus]
source = "text"
paths = ["{data["corpus"]["paths"][0]}"]
ctx_len = 32
[harvest]
sites = ["blocks.1.hook_resid_post"]
batch_windows = 4
[train]
architecture = "topk"
expansion_factor = 2
k = 4
total_tokens = 8192
batch_size = 512
lr = 0.001
warmup_steps = 2
checkpoint_every = 5
[eval]
ce_tokens = 256
[run]
threads = 1
progress = false
""",
    )
    from_yaml, from_toml = load_pipeline_config(tiny), load_pipeline_config(toml)
    # TOML has no null: its dashboard section is the default where the YAML says `dashboard: null`
    assert from_toml.model_dump(exclude={"dashboard"}) == from_yaml.model_dump(exclude={"dashboard"})
    with pytest.raises(UserError, match=r"pipeline\.toml is not valid TOML"):
        load_pipeline_config(_write(tmp_path / "pipeline.toml", "[harvest\nsites = 1"))
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline_config(tmp_path / "nope.yaml")


def test_pipeline_runs_every_step_and_a_rerun_is_cached(tiny: Path) -> None:
    summary = pipeline(str(tiny))
    store = Store(summary["store"])
    assert Path(summary["store"]) == tiny.parent / "store"  # relative to the config file, not the cwd
    harvest = store.manifest("harvest", summary["harvest_id"])
    assert harvest.counts["n_tokens"] == summary["n_tokens"] > 40_000

    # the stored activations are HF's own hidden states of the stored token windows
    acts = store.activations(summary["harvest_id"], "blocks.1.hook_resid_post")
    tokens = store.tokens(summary["corpus_id"]).sort("tok").head(8 * 32).collect()["token_id"].to_numpy()
    model = AutoModelForCausalLM.from_pretrained(tiny.parent / "model").eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens.astype(np.int64)).view(8, 32), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(
        np.asarray(acts[: 8 * 32]), hidden[2].reshape(-1, hidden[2].shape[-1]).numpy(), rtol=1e-4, atol=1e-4
    )

    (entry,) = summary["saes"]
    features = store.features(entry["sae_id"], summary["harvest_id"])
    assert features.density().collect().height > 0
    evaluation = store.manifest("eval", entry["eval_id"])
    assert evaluation.extra["summary"]["l0"] == pytest.approx(4.0)
    first = _latest_steps_task_states()
    assert set(first["harvest-shard"]) == {"Completed"} and set(first["encode-shard"]) == {"Completed"}

    before = snapshot(Path(summary["store"]))
    again = pipeline(str(tiny))
    assert again["saes"] == summary["saes"]
    assert snapshot(Path(summary["store"])) == before  # nothing rewritten, nothing added
    second = _latest_steps_task_states()
    for name in ("prepare-harvest", "harvest-shard", "encode-shard", "evaluate"):
        assert set(second[name]) == {"Cached"}, (name, second[name])

    # outputs deleted behind Prefect's back: their cached task results must not stand in for them
    data = stored_data(Path(summary["store"]))
    shutil.rmtree(store.harvest_dir(summary["harvest_id"]))
    shutil.rmtree(store.eval_dir(entry["eval_id"]))
    assert pipeline(str(tiny))["saes"] == summary["saes"]
    assert stored_data(Path(summary["store"])) == data
    third = _latest_steps_task_states()
    for name in ("prepare-harvest", "harvest-shard", "evaluate"):
        assert set(third[name]) == {"Completed"}, (name, third[name])
    assert set(third["encode-shard"]) == {"Cached"}

    with get_client(sync_client=True) as client:
        markdown = client.read_latest_artifacts()
    keys = {a.key for a in markdown}
    assert {"tiny-summary", "tiny-headline"} <= keys


def test_pipeline_on_an_object_store_root_publishes_every_object(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    data = yaml.safe_load(tiny.read_text())
    data.pop("train")  # ingest and harvest only
    url = f"memory://actstore-pipeline/{tmp_path.name}"
    config = _write(tmp_path / "remote.yaml", yaml.safe_dump({**data, "store": url}))
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache-a"))
    remote = pipeline(str(config))
    local = pipeline(str(config), store=str(tmp_path / "local"))
    assert remote["harvest_id"] == local["harvest_id"]

    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache-b"))  # a reader elsewhere: nothing cached
    reader = Store(url)
    assert {(e.kind, e.id, e.complete) for e in reader.ls()} == {
        ("corpus", remote["corpus_id"], True),
        ("harvest", remote["harvest_id"], True),
    }
    site = "blocks.1.hook_resid_post"
    np.testing.assert_array_equal(
        np.asarray(reader.activations(remote["harvest_id"], site)[:]),
        np.asarray(Store(tmp_path / "local").activations(local["harvest_id"], site)[:]),
    )
    assert reader.remote is not None
    fs = reader.remote.fs
    parts = fs.glob(reader.remote.path(f"corpora/{remote['corpus_id']}") + "/*.parquet")
    tokens = pq.read_table(parts, filesystem=fs)  # pyarrow straight from the object store
    assert tokens.num_rows == Store(tmp_path / "local").tokens(local["corpus_id"]).collect().height


def test_shards_cover_every_chunk_once_and_gpu_tasks_follow_the_cluster() -> None:
    from actstore.flows.orchestration.cluster import Cluster, shard_ranges, uses_gpu

    for n_chunks, cluster, per in [
        (386, Cluster(), None),
        (386, Cluster(local_workers=2, workers=2), None),
        (10, Cluster(address="tcp://x:1", workers=3), 4),
        (1, Cluster(), None),
    ]:
        shards = shard_ranges(n_chunks, cluster, per)
        assert [c for s in shards for c in s] == list(range(n_chunks))
        assert len(shards) == (1 if not cluster.distributed else -(-n_chunks // (per or -(-n_chunks // 8))))
    assert uses_gpu("cuda:1", Cluster()) and not uses_gpu("cpu", Cluster(address="a", workers=1, gpus=1))
    assert uses_gpu("auto", Cluster(address="a", workers=2, gpus=2))
    assert not uses_gpu("auto", Cluster(address="a", workers=2, gpus=0))
    assert uses_gpu("auto", Cluster()) == torch.cuda.is_available()
