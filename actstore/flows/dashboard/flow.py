"""`actstore dashboard`: a static HTML site of an SAE's features on a harvest, opened from disk or served locally.

    site = dashboard(store_root, sae_id, harvest_id)      # -> <root>/dashboards/<sae_id>/<harvest_id>/
    open(site / "index.html") in a browser, or dashboard_server(site).serve_forever()

The site is built in a sibling temp directory and renamed into place, so a killed run leaves the previous
dashboard whole. A Prefect link artifact points at its index.
"""

import functools
import html
import http.server
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from actstore.flows.dashboard.data import DEFAULT_OPTIONS, DashboardOptions, gather
from actstore.flows.dashboard.pages import LogitTokens, SiteInfo, write_site
from actstore.flows.dashboard.plots import write_plots
from actstore.flows.dashboard.results import gather_results
from actstore.flows.runtime import cached_model, flow, run_logger, task, tracked
from actstore.schemas.errors import UserError
from actstore.schemas.model import ModelConfig
from actstore.store.files import read_manifest, staged_directory
from actstore.store.root import Store
from actstore.transforms.logit_weights import top_tokens, unembedding
from actstore.transforms.models import load_tokenizer, pick_device
from actstore.transforms.sae import load

DASHBOARDS_DIR = "dashboards"
RECORD_NAME = "dashboard.json"
"""What built the site (ids, options, counts, timings); its presence marks a directory as a dashboard."""
LOGIT_TOKENS = 10


class DashboardPlan(NamedTuple):
    """What the render needs to know about the store objects, checked before anything is written."""

    site_dir: str
    site: str
    """The harvest site the features were encoded from."""
    ctx_len: int
    model: ModelConfig
    title: str
    facts: dict[str, str]


def default_site_dir(store_root: str, sae_id: str, harvest_id: str) -> Path:
    """Where a dashboard goes unless told otherwise: next to the store's other objects."""
    return Store(store_root).root / DASHBOARDS_DIR / sae_id / harvest_id


@task(name="plan-dashboard")
def plan_dashboard(store_root: str, sae_id: str, harvest_id: str, out: str | None) -> DashboardPlan:
    """Check that the features exist and that the output is a new directory or a dashboard to replace."""
    store = Store(store_root)
    features = store.features(sae_id, harvest_id)
    harvest = store.manifest("harvest", harvest_id)
    corpus = store.manifest("corpus", harvest.extra["corpus_id"])
    encoded = read_manifest(store.features_dir(sae_id, harvest_id))
    site_dir = Path(out).expanduser() if out else default_site_dir(store_root, sae_id, harvest_id)
    if site_dir.exists() and (
        not site_dir.is_dir() or (any(site_dir.iterdir()) and not (site_dir / RECORD_NAME).is_file())
    ):
        raise UserError(f"{site_dir} exists and is not a dashboard: choose a new or empty directory for --out")
    site = str(encoded.extra["site"]) if encoded else ""
    config = features.config
    facts = {
        "SAE": sae_id,
        "harvest": harvest_id,
        "site": site,
        "model": str(harvest.config["model"]["name"]),
        "tokens": f"{config.n_tokens:,}",
        "features": f"{config.d_sae:,}",
        "non-zeros": f"{features.index.nnz:,}",
    }
    return DashboardPlan(
        str(site_dir),
        site,
        int(corpus.config["ctx_len"]),
        ModelConfig.model_validate(harvest.config["model"]),
        f"{sae_id} on {harvest_id}",
        facts,
    )


@task(name="dashboard-logit-tokens", cache_policy=NO_CACHE)
def logit_tokens(store_root: str, sae_id: str, model: ModelConfig, device: str, k: int) -> LogitTokens | None:
    """Each feature's most promoted and suppressed tokens through the unembedding (None when the SAE's width is
    not the model's residual width, as for an SAE on attention heads' outputs)."""
    sae = load(Store(store_root).sae_dir(sae_id))
    w_u = unembedding(cached_model(model, str(pick_device(device))))
    if sae.d_in != w_u.shape[0]:
        run_logger().warning(
            "SAE width %d is not the model's residual width %d: no logit tokens", sae.d_in, w_u.shape[0]
        )
        return None
    top = top_tokens(sae.W_dec.detach(), w_u, k)
    return LogitTokens(*(t.numpy() for t in top))


@task(name="render-dashboard", cache_policy=NO_CACHE)
def render(
    store_root: str,
    sae_id: str,
    harvest_id: str,
    plan: DashboardPlan,
    options: DashboardOptions,
    logits: LogitTokens | None,
    workers: int,
) -> dict[str, Any]:
    """Gather, plot and write the whole site into a staged directory, then publish it in one rename."""
    store = Store(store_root)
    tokenizer = load_tokenizer(plan.model)
    queries = store.features(sae_id, harvest_id)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    results = gather_results(store, sae_id, harvest_id, plan.site)
    data = gather(queries, plan.ctx_len, options, results.per_feature, workers)
    timings["gather_s"] = time.perf_counter() - start
    final = Path(plan.site_dir)
    with staged_directory(final) as staging:
        mark = time.perf_counter()
        plots = write_plots(staging, results, sae_id, data.index["density"].to_numpy())
        timings["plots_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        info = SiteInfo(plan.title, plan.facts, results.headline, results.headline_source, plots)
        pages = write_site(staging, data, lambda ids: tokenizer.decode(list(ids)), info, logits, workers)
        timings["pages_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - start
        record = {
            "sae_id": sae_id,
            "harvest_id": harvest_id,
            "site": plan.site,
            "options": options._asdict(),
            "pages": pages,
            "dead": int((data.index["count"] == 0).sum()),
            "plots": [p.file for p in plots],
            "headline": results.headline,
            "headline_source": results.headline_source,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2, default=float) + "\n")
    return record


def artifact_key(sae_id: str, harvest_id: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming this dashboard."""
    return re.sub(r"[^a-z0-9-]+", "-", f"dashboard-{sae_id}-{harvest_id}".lower())


@flow(name="dashboard")
def dashboard(
    store_root: str,
    sae_id: str,
    harvest_id: str,
    out: str | None = None,
    logits: bool = True,
    device: str = "auto",
    options: DashboardOptions | None = None,
    workers: int | None = None,
) -> Path:
    """SAE x harvest -> a static site (index + one page per feature that fires); returns its directory.

    `logits`: compute each feature's top logit tokens (loads the harvest's model on `device`); `out`: where to
    write the site (default `<root>/dashboards/<sae_id>/<harvest_id>/`); `workers`: threads for reading and
    writing (default: all cores)."""
    options = options or DEFAULT_OPTIONS
    plan = plan_dashboard(store_root, sae_id, harvest_id, out)
    top = logit_tokens(store_root, sae_id, plan.model, device, LOGIT_TOKENS) if logits else None
    record = render(store_root, sae_id, harvest_id, plan, options, top, workers or os.cpu_count() or 1)
    site = Path(plan.site_dir).resolve()
    numbers = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in record["headline"].items()
    )
    if tracked():  # the Prefect UI links to the site; a plain CLI run prints its path instead
        create_link_artifact(
            link=(site / "index.html").as_uri(),
            link_text=f"dashboard of {sae_id}",
            key=artifact_key(sae_id, harvest_id),
            description=f"{record['pages']} feature pages, {record['dead']} dead features; "
            f"{html.escape(record['headline_source'])}\n\n| metric | value |\n|---|---|\n{numbers}",
        )
    return site


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site's files; no per-request log lines."""

    def log_message(self, format: str, *args: Any) -> None:
        logging.getLogger(__name__).debug(format, *args)


def dashboard_server(site: str | Path, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server of a built site on this machine only (`port=0` picks a free one); call `serve_forever()`,
    or `serve_in_thread`."""
    directory = Path(site)
    if not (directory / "index.html").is_file():
        raise UserError(f"{directory} holds no dashboard (no index.html): run `actstore dashboard` first")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port} ({exc.strerror}): pass another --port") from exc


def serve_in_thread(server: http.server.ThreadingHTTPServer) -> str:
    """Start serving in a daemon thread; returns the index URL. Stop with `server.shutdown()`."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/index.html"
