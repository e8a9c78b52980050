"""What a pipeline run leaves in the Prefect UI: a markdown summary and a table of the headline numbers."""

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from actstore.schemas.ids import slug
from actstore.schemas.pipeline import PipelineConfig

HEADLINE = (
    "l0",
    "explained_variance",
    "fvu",
    "ce_recovered_zero",
    "ce_recovered_mean",
    "ce_clean",
    "ce_spliced",
    "kl_spliced",
    "dead",
    "dense_1pct",
)
"""Eval summary numbers shown per SAE (those the evaluation computed)."""


def headline_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per SAE: its site and id, the feature-store counts and the eval numbers it has."""
    rows = []
    for entry in summary["saes"]:
        numbers = entry.get("eval", {})
        rows.append(
            {
                "site": entry["site"],
                "sae_id": entry["sae_id"],
                "nnz": entry.get("nnz"),
                "alive": entry.get("alive"),
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in numbers.items() if k in HEADLINE},
            }
        )
    return rows


def summary_markdown(config: PipelineConfig, summary: dict[str, Any]) -> str:
    lines = [
        f"# pipeline `{config.name}`",
        "",
        f"- store: `{summary['store']}`",
        f"- model: `{config.model.label()}`; sites: {', '.join(f'`{s}`' for s in config.harvest.sites)}",
        f"- corpus `{summary['corpus_id']}`, harvest `{summary['harvest_id']}`: {summary['n_tokens']:,} tokens",
        f"- ran on: {summary['cluster']} ({summary['workers']} worker processes) in {summary['seconds']} s",
    ]
    for entry in summary["saes"]:
        lines.append(
            f"- SAE `{entry['sae_id']}` on `{entry['site']}`"
            + (f": dashboard `{entry['dashboard']}`" if "dashboard" in entry else "")
        )
    rows = headline_rows(summary)
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(config: PipelineConfig, summary: dict[str, Any]) -> None:
    """Artifacts keyed by the pipeline's name, so each run adds a version the UI lists under one key."""
    key = slug(config.name)
    create_markdown_artifact(
        summary_markdown(config, summary),
        key=f"{key}-summary",
        description=f"pipeline {config.name}: what ran and what it stored",
    )
    rows = headline_rows(summary)
    if rows:
        create_table_artifact(rows, key=f"{key}-headline", description="headline numbers per SAE")
