"""Train: shuffled activation shards from the store -> an SAE in SAELens' layout, resumable from checkpoints.

The story: `train_sae` streams batches from `store.shards.ShardReader` (train split, BOS dropped) into
`transforms.sae_training.Trainer`, checkpoints trainer state and reader position every `checkpoint_every`
steps, logs every step to Parquet, evaluates on the holdout split, and saves the SAE where `actstore encode`
and SAELens read it. A killed run restarts from its last checkpoint and takes the identical next batch.
"""

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm.auto import tqdm

from actstore.flows.runtime import flow, task
from actstore.schemas.errors import UserError
from actstore.schemas.manifest import Manifest
from actstore.schemas.train_run import TrainRun
from actstore.store.files import (
    atomic_write_json,
    explain_os_error,
    fsync_path,
    object_lock,
)
from actstore.store.harvests import harvest_model_label
from actstore.store.root import Store
from actstore.store.shards import ShardReader
from actstore.transforms.sae import save
from actstore.transforms.sae_eval import evaluate
from actstore.transforms.sae_training import Trainer

CHECKPOINT_POINTER = "checkpoint.json"
LOG_NAME = "training_log.parquet"


def endless(reader: ShardReader) -> Iterator[torch.Tensor]:
    """Batches across epochs: the reader moves to the next epoch (a fresh permutation) by itself."""
    while True:
        yield from reader


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / CHECKPOINT_POINTER
    if not pointer.exists():
        return None
    return directory / json.loads(pointer.read_text())["dir"]


def write_checkpoint(directory: Path, trainer: Trainer, reader: ShardReader, log: list[dict[str, Any]]) -> None:
    """A new checkpoint directory, then an atomic pointer switch, then the old one goes: a kill at any moment
    leaves one complete checkpoint to resume from."""
    name = f"_checkpoint-{trainer.steps_done:09d}"
    target = directory / name
    shutil.rmtree(target, ignore_errors=True)
    trainer.save_state(target)
    atomic_write_json(target / "reader.json", reader.state_dict())
    pl.DataFrame(log).write_parquet(target / LOG_NAME)
    fsync_path(target / LOG_NAME)
    fsync_path(target)
    previous = latest_checkpoint(directory)
    atomic_write_json(directory / CHECKPOINT_POINTER, {"dir": name, "step": trainer.steps_done})
    if previous is not None and previous != target:
        shutil.rmtree(previous, ignore_errors=True)


@task(name="train-sae")
def train_sae(store_root: str, run: TrainRun, progress: bool = True) -> Manifest:
    """Train (or resume) one SAE and publish it with its holdout evaluation."""
    store = Store(store_root)
    harvest = store.manifest("harvest", run.harvest_id)
    acts = store.activations(run.harvest_id, run.site)
    d_in = acts.attrs.d
    sae_id = run.sae_id(d_in)
    stored = store.object("sae", sae_id)
    existing = stored.published()
    if existing is not None:
        return existing
    directory = stored.local
    cfg = run.train
    steps = cfg.total_tokens // cfg.batch_size
    if steps == 0:
        raise UserError(
            f"total_tokens {cfg.total_tokens} is less than one batch of {cfg.batch_size}: "
            "raise --tokens or lower --batch-size"
        )
    drop = {0} if run.drop_bos else set()

    def shards(split: str, seed: int) -> ShardReader:
        return ShardReader(
            store,
            [(run.harvest_id, run.site)],
            cfg.batch_size,
            seed=seed,
            buffer_tokens=run.buffer_tokens,
            split=split,
            drop_positions=drop,
        )

    reader = shards("train", cfg.seed)
    trainer = Trainer(cfg, d_in)
    start = time.perf_counter()
    try:
        with object_lock(directory), stored.publish(run, staged=False) as pub:
            log: list[dict[str, Any]] = []
            checkpoint = latest_checkpoint(directory)
            if checkpoint is not None:
                trainer.load_state(checkpoint)
                reader.load_state_dict(json.loads((checkpoint / "reader.json").read_text()))
                log = pl.read_parquet(checkpoint / LOG_NAME).to_dicts()
            else:
                init = []
                for batch in shards("train", cfg.seed):
                    init.append(batch)
                    if sum(len(b) for b in init) >= cfg.init_tokens:
                        break
                trainer.init_from_data(init)
            bar = tqdm(total=steps, initial=trainer.steps_done, unit="step", desc=sae_id, disable=not progress)
            batches = endless(reader)
            while trainer.steps_done < steps:
                metrics = trainer.step(next(batches))
                log.append({"step": trainer.steps_done, "tokens": trainer.tokens_seen, **metrics._asdict()})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics.loss:.3g}", l0=f"{metrics.l0:.1f}", fvu=f"{metrics.fvu:.3f}", dead=metrics.dead
                )
                if trainer.steps_done % run.checkpoint_every == 0 and trainer.steps_done < steps:
                    write_checkpoint(directory, trainer, reader, log)
            bar.close()
            train_seconds = time.perf_counter() - start
            sae = trainer.export(
                hook_name=run.site,
                model_name=harvest_model_label(harvest),
                metadata={"sae_id": sae_id, "harvest_id": run.harvest_id},
            )
            evaluation = evaluate(sae, _limited(shards("holdout", 0), run.eval_tokens))
            save(sae, directory)
            pl.DataFrame(log).write_parquet(directory / LOG_NAME)
            pub.counts = {"d_in": d_in, "d_sae": sae.d_sae, "steps": trainer.steps_done, "tokens": trainer.tokens_seen}
            pub.timings = {
                "train_seconds": round(train_seconds, 3),
                "steps_per_s": round(len(log) / train_seconds, 3) if train_seconds else 0.0,
            }
            pub.extra = {
                "eval_holdout": evaluation,
                "final_step": log[-1] if log else {},
                "source": "trained",
                "harvest_id": run.harvest_id,
                "site": run.site,
            }
            # the checkpoints go before the manifest: a published SAE is its weights, log and config only
            checkpoint = latest_checkpoint(directory)
            (directory / CHECKPOINT_POINTER).unlink(missing_ok=True)
            if checkpoint is not None:
                shutil.rmtree(checkpoint, ignore_errors=True)
    except OSError as exc:
        raise explain_os_error(exc, directory) from exc
    return pub.manifest


def _limited(reader: ShardReader, tokens: int) -> Iterator[torch.Tensor]:
    seen = 0
    for batch in reader:
        if seen >= tokens:
            return
        yield batch[: tokens - seen]
        seen += len(batch)


@flow(name="train")
def train(store_root: str, run: TrainRun, progress: bool = True) -> Manifest:
    """Harvested activations -> a trained SAE in the store (`saes/<sae_id>`), resumable."""
    return train_sae(store_root, run, progress)
