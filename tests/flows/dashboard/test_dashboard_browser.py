"""The dashboard of the demo's SAE (the embedded SmolLM2, small sizes), driven in headless Chromium (Debian's
`chromium`, through Playwright): the index lists every feature and sorts and filters, a feature page shows the
store's top examples token by token with the activating token marked and the tokens shaded, and no page asks for
anything beyond its own files (from disk) or the local server (with --serve). Screenshots of the index and of a
feature page are saved under the test's tmp dir and copied to tests/artifacts/."""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pytest
import torch
from playwright.sync_api import Browser, Page, sync_playwright

from actstore.flows.dashboard.data import DashboardOptions
from actstore.flows.dashboard.flow import RECORD_NAME, artifact_key, dashboard, dashboard_server, serve_in_thread
from actstore.flows.encode import encode
from actstore.flows.eval import evaluate
from actstore.flows.harvest import harvest
from actstore.flows.ingest import ingest
from actstore.flows.runtime import cached_model
from actstore.flows.train import train
from actstore.schemas.corpus import CorpusConfig
from actstore.schemas.encode import EncodeRuntime
from actstore.schemas.errors import UserError
from actstore.schemas.eval import EvalConfig, EvalRuntime
from actstore.schemas.harvest import HarvestConfig, HarvestRuntime
from actstore.schemas.model import ModelConfig
from actstore.schemas.train import TrainConfig
from actstore.schemas.train_run import TrainRun
from actstore.store.root import Store
from actstore.transforms.models import load_tokenizer
from actstore.transforms.sae import load
from actstore.transforms.sites import n_layers

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Demo(NamedTuple):
    root: Path
    sae_id: str
    harvest_id: str
    site: Path
    summary: pl.DataFrame


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The demo's pipeline (pydocs -> a middle layer's resid_post -> TopK SAE -> features -> evaluation) at small
    sizes and without its randomized-weights control or downstream loss, then the dashboard."""
    root = str(tmp_path_factory.mktemp("dashboard-demo") / "store")
    model = ModelConfig()
    corpus = ingest(root, CorpusConfig(source="pydocs", tokenizer=model, ctx_len=128, max_tokens=8192))
    site = f"blocks.{n_layers(cached_model(model, 'cpu')) // 2}.hook_resid_post"
    harvested = harvest(
        root,
        HarvestConfig(corpus_id=corpus.id, model=model, sites=(site,)),
        HarvestRuntime(device="cpu", progress=False),
    )
    config = TrainConfig(
        architecture="topk",
        expansion_factor=4,
        k=32,
        total_tokens=4096 * 8,
        batch_size=4096,
        lr=1e-3,
        warmup_steps=10,
        device="cpu",
    )
    sae = train(root, TrainRun(harvest_id=harvested.id, site=site, train=config, checkpoint_every=25), progress=False)
    encode(root, sae.id, harvested.id, site, runtime=EncodeRuntime(device="cpu", progress=False))
    evaluate(
        root,
        EvalConfig(sae_id=sae.id, harvest_id=harvested.id, site=site, ce_tokens=0),
        EvalRuntime(device="cpu", progress=False),
    )
    built = dashboard(root, sae.id, harvested.id)
    summary = Store(root).features(sae.id, harvested.id).summary.collect()
    return Demo(Path(root), sae.id, harvested.id, built, summary)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "headless Chromium is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Session(NamedTuple):
    page: Page
    requests: list[str]


@pytest.fixture
def session(browser: Browser) -> Iterator[Session]:
    """A fresh page that records every request it makes; requests to any host are aborted, not sent."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    context.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith(("file://", "http://127.0.0.1:")) else route.abort()
        ),
    )
    yield Session(context.new_page(), requests)
    context.close()


def save_screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=name.startswith("feature"))
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {kept}")
    return kept


def column(page: Page, name: str) -> int:
    heads = page.locator("#features thead tr").first.locator("th").all_text_contents()
    return [h.strip() for h in heads].index(name)


def cells(page: Page, index: int) -> list[float]:
    """One column of the rows that pass the filters, in table order (all pages)."""
    return page.eval_on_selector_all(
        "#features tbody tr:not([data-out])", f"rows => rows.map(r => parseFloat(r.cells[{index}].textContent))"
    )


def test_index_lists_every_feature_sorts_and_filters(demo: Demo, session: Session, tmp_path: Path) -> None:
    page = session.page
    page.goto((demo.site / "index.html").as_uri())
    live = demo.summary.filter(pl.col("count") > 0)
    dead = len(demo.summary) - len(live)
    assert page.locator("#features tbody tr").count() == len(live)
    assert page.locator("#shown").text_content() == str(len(live))
    page_rows = int(page.locator("#features").get_attribute("data-page-rows") or 0)
    assert page.locator("#features tbody tr:not([hidden])").count() == min(page_rows, len(live))
    assert page.locator("#dead").count() == (1 if dead else 0)
    # the evaluation's plots are there: L0 vs explained variance, density, per-token MSE vs L0
    assert [img.get_attribute("alt") for img in page.locator("#plots img").all()] == [
        "L0 vs explained variance of the SAEs in the store",
        "feature density",
        "per-token MSE vs L0",
    ]
    assert (page.locator("#headline caption").text_content() or "").startswith("evaluation eval-")
    assert all(page.eval_on_selector_all("#plots img", "imgs => imgs.map(i => i.naturalWidth > 0)"))

    max_col = column(page, "max")
    page.locator("#features thead tr").first.locator("th").nth(max_col).click()
    highest_first = cells(page, max_col)
    assert highest_first == sorted(highest_first, reverse=True)
    top_feature = int(page.locator("#features tbody tr").first.locator("td").first.text_content() or -1)
    assert demo.summary["max"][top_feature] == pytest.approx(float(live["max"].max()), rel=1e-3)  # type: ignore[arg-type]
    page.locator("#features thead tr").first.locator("th").nth(max_col).click()
    lowest_first = cells(page, max_col)
    assert lowest_first == sorted(lowest_first) and len(lowest_first) == len(live)

    density_col = column(page, "density")
    # Densities are multiples of 1/8192: none lies near 0.01, so the rounded cells filter like the exact values.
    page.locator("#features tr.filters th").nth(density_col).locator("input").first.fill("0.01")
    expected = live.filter(pl.col("density") >= 0.01).height
    assert page.locator("#shown").text_content() == str(expected)
    assert page.locator("#features tbody tr:not([data-out])").count() == expected
    assert page.locator("#features tbody tr:not([hidden])").count() == min(page_rows, expected)
    assert min(cells(page, density_col)) >= 0.01
    if expected > page_rows:  # the next page shows the next rows of the same order
        page.click("#next")
        assert page.locator("#range").text_content() == f"{page_rows + 1}–{min(2 * page_rows, expected)}"
        first_shown = page.locator("#features tbody tr:not([hidden]) td").first.text_content()
        assert (
            first_shown
            == page.locator("#features tbody tr:not([data-out])").nth(page_rows).locator("td").first.text_content()
        )
        page.click("#previous")
    page.evaluate("window.scrollTo(0, 0)")
    save_screenshot(page, tmp_path, "index.png")
    assert session.requests and all(url.startswith("file://") for url in session.requests), session.requests


def display(text: str) -> str:
    return text.replace("\n", "⏎")


def test_feature_page_shows_the_stores_top_examples(demo: Demo, session: Session, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelConfig())
    queries = Store(demo.root).features(demo.sae_id, demo.harvest_id, decode=lambda ids: tokenizer.decode(list(ids)))
    # a feature of middling density, as the demo prints
    middling = demo.summary.filter(pl.col("density").is_between(0.002, 0.02)).sort("density", "feature")
    feature = int(middling["feature"][len(middling) // 2])
    top = queries.top_examples(feature, k=DashboardOptions().top_k, context=DashboardOptions().context).collect()

    page = session.page
    page.goto((demo.site / "features" / f"{feature}.html").as_uri())
    rows = page.locator("#top .ex")
    assert rows.count() == len(top) > 0
    for i, example in enumerate(top.iter_rows(named=True)):
        row = rows.nth(i)
        tokens = row.locator(".l > span, .r > span")
        assert tokens.all_text_contents() == [display(t) for t in example["context_tokens"]]
        marked = row.locator(".c")
        assert marked.count() == 1
        assert marked.text_content() == display(example["context_tokens"][example["center"]])
        assert float(row.locator(".v").text_content() or "nan") == pytest.approx(example["value"], abs=5e-4)
        shade = marked.evaluate("e => getComputedStyle(e).backgroundColor")
        assert shade not in ("rgba(0, 0, 0, 0)", "transparent"), shade  # the activating token is highlighted
    assert rows.first.locator(".c").get_attribute("style") == "--a:100%"  # the feature's max: full shade

    histogram = page.locator("svg.hist rect")
    assert histogram.count() == DashboardOptions().bins
    counted = sum(int((t or "0").rsplit(": ", 1)[1]) for t in histogram.locator("title").all_text_contents())
    assert counted == int(demo.summary["count"][feature])

    # top promoted tokens: W_dec[feature] through the final norm's gain and the unembedding, computed here
    model = cached_model(ModelConfig(), "cpu")
    sae = load(Store(demo.root).sae_dir(demo.sae_id))
    w_u = model.get_output_embeddings().weight.detach().float() * model.model.norm.weight.detach().float()
    weights = sae.W_dec.detach().float()[feature] @ w_u.T
    promoted = [display(tokenizer.decode([int(i)])) for i in torch.topk(weights, 10).indices]
    assert page.locator("ol.logits.pos .tok").all_text_contents() == promoted
    suppressed = [display(tokenizer.decode([int(i)])) for i in torch.topk(-weights, 10).indices]
    assert page.locator("ol.logits.neg .tok").all_text_contents() == suppressed

    save_screenshot(page, tmp_path, "feature.png")
    links = page.locator("#cooccurring a")
    assert links.count() > 0
    other = links.first.text_content()
    links.first.click()
    page.wait_for_load_state()
    assert page.locator("h1").text_content() == f"Feature {other}"
    assert all(url.startswith("file://") for url in session.requests), session.requests


def test_served_site_asks_only_the_local_server(demo: Demo, session: Session) -> None:
    server = dashboard_server(demo.site, port=0)
    try:
        url = serve_in_thread(server)
        page = session.page
        page.goto(url)
        assert page.locator("#features tbody tr").count() == int((demo.summary["count"] > 0).sum())
        page.locator("#features tbody tr").first.locator("a").click()
        page.wait_for_load_state()
        assert page.locator("#top .ex").count() > 0
        origin = url.rsplit("/", 1)[0] + "/"
        assert all(request.startswith(origin) for request in session.requests), session.requests
    finally:
        server.shutdown()
        server.server_close()


def test_prefect_artifact_links_to_the_dashboard(demo: Demo) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found: list[Any] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(demo.sae_id, demo.harvest_id)]))
        )
    assert found and (demo.site / "index.html").as_uri() in str(found[0].data)


def test_rerun_replaces_the_dashboard_and_refuses_other_directories(demo: Demo, tmp_path: Path) -> None:
    out = tmp_path / "site"
    first = dashboard(str(demo.root), demo.sae_id, demo.harvest_id, out=str(out), logits=False)
    feature = int(demo.summary.filter(pl.col("count") >= 100)["feature"][0])
    top_section = (first / "features" / f"{feature}.html").read_text().split('<section id="quantiles">')[0]
    assert top_section.count('<div class="ex">') == 20
    again = dashboard(
        str(demo.root),
        demo.sae_id,
        demo.harvest_id,
        out=str(out),
        logits=False,
        options=DashboardOptions(top_k=3, per_bucket=1),
    )
    page = (again / "features" / f"{feature}.html").read_text()
    assert again == first and (again / RECORD_NAME).is_file()
    assert page.count('<div class="ex">') == 3 + 4 and 'id="logits"' not in page  # 3 top, 1 from each bucket
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("not a dashboard")
    with pytest.raises(UserError, match="is not a dashboard"):
        dashboard(str(demo.root), demo.sae_id, demo.harvest_id, out=str(other), logits=False)
    assert (other / "notes.txt").read_text() == "not a dashboard"
