"""``python -m pipeline dashboard``: the project's W&B dashboards, built in code and saved to W&B.

    python -m pipeline dashboard --entity my-team --kind degradation --group degradation-cifar10
    python -m pipeline dashboard --entity my-team --project resnet-pipeline --kind training
    python -m pipeline dashboard --entity my-team --kind imagenet-tables --dry-run > report.json

Kinds (``build_view``): ``training`` (a workspace view), ``degradation`` (the paper's Figure 6
as a report) and ``imagenet-tables`` (final errors vs the paper, a report), all three from
``pipeline.tracking.dashboard_views``; ``construction`` (the constructed solution's runs, a
report) from ``pipeline.construction.views``.

Online, the view is saved with ``wandb-workspaces``' own ``Workspace.save()`` /
``Report.save()`` (each call adds a new saved view or report) and its URL printed. With
``--dry-run``, or when there is no API key or the W&B server cannot be reached (the command
says which), it prints as JSON the exact request it would send instead: the ``upsertView``
fields with the view's spec, which is what W&B stores. Every metric, summary and config key
the view names is first checked against ``pipeline.tracking.tracker``'s metric lists and the config's
fields, so a renamed metric fails here instead of leaving an empty panel.

Needs the optional extra: ``pip install -e '.[dashboards]'`` (``wandb-workspaces``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import Config, TrackingConfig, to_dict
from pipeline.tracking.tracker import FINAL_SUMMARY_METRICS, LOGGED_METRICS
from pipeline.train.derived import Derived

KINDS = ("training", "degradation", "imagenet-tables", "construction")
INSTALL = "pip install -e '.[dashboards]'"
PROBE_TIMEOUT_S = 10.0  # connecting to the W&B server; past this it counts as unreachable
# W&B's own history keys, usable as x-axes.
BUILTIN_AXES = frozenset({"_step", "_runtime", "_timestamp", "_absolute_runtime"})
# Panels that name no metric key (the checker fails on any other panel type it does not know).
KEYLESS_PANELS = frozenset({"Run Comparer", "Markdown Panel"})
# W&B entity (user or team) names: letters, digits, - _ and dots.
_ENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# W&B refuses these characters in project names.
_PROJECT = re.compile(r"[^/\\#?%:]+")
# A group may hold anything tracking.group does, except quotes and backslashes.
_GROUP = re.compile(r"[^'\"\\]+")


# ---------------------------------------------------------------- the view of each kind


def build_view(kind: str, entity: str, project: str, group: str | None = None) -> Any:
    """The workspace or report of one of ``KINDS``, built without network.

    Args:
        kind: one of ``KINDS``.
        entity: W&B user or team.
        project: W&B project.
        group: only runs of this W&B group; None: the kind's default.
    """
    # Imported here, not at the top: wandb-workspaces is an optional extra, and `main` says how
    # to install it before anything needs it. The command owns this table, so the generic views
    # and the construction's views need not import each other.
    from pipeline.construction.views import construction_report
    from pipeline.tracking.dashboard_views import (
        degradation_report,
        imagenet_tables_report,
        training_workspace,
    )

    builders = {
        "training": training_workspace,
        "degradation": degradation_report,
        "imagenet-tables": imagenet_tables_report,
        "construction": construction_report,
    }
    return builders[kind](entity, project, group)


# ---------------------------------------------------------------- keys a view names


@dataclasses.dataclass
class ViewKeys:
    """Every key a serialised view refers to, by where W&B looks it up."""

    history: set[str] = dataclasses.field(default_factory=set)  # logged metrics (chart axes)
    summary: set[str] = dataclasses.field(default_factory=set)  # run summary (table columns)
    config: set[str] = dataclasses.field(default_factory=set)  # dotted config paths
    unknown_panels: set[str] = dataclasses.field(default_factory=set)


def print_dashboard_command(kind: str, tracking: TrackingConfig, what: str = "") -> None:
    """Say the `pipeline dashboard` command that builds the W&B report of runs logged under
    ``tracking`` (entity, project, group); `make degradation` and `make construction` end with it."""
    import shlex

    args = ["--kind", kind, "--entity", tracking.entity or "ENTITY", "--project", tracking.project]
    args += ["--group", tracking.group] if tracking.group else []
    print(f"W&B report of these runs{what} (upload offline runs first with `wandb sync`):")
    print("  python -m pipeline dashboard " + " ".join(shlex.quote(a) for a in args))
    if not tracking.entity:
        print("  (ENTITY: your W&B user or team; tracking.entity is not set)")


def _config_path(backend_name: str) -> str:
    # W&B stores each top-level config key as {"value": ...}: "model.value.name" -> "model.name".
    parts = backend_name.split(".")
    return ".".join(parts[:1] + parts[2:]) if len(parts) > 1 and parts[1] == "value" else backend_name


def _add_key(keys: ViewKeys, section: str, name: str) -> None:
    if section == "config":
        keys.config.add(_config_path(name))
    elif section == "summary":
        keys.summary.add(name)
    # "run": W&B's run attributes (name, group, state, ...), not ours to check.


def view_keys(spec: Any, keys: ViewKeys | None = None) -> ViewKeys:
    """Collect the keys a view spec (the JSON W&B stores) refers to.

    Looks at line plots (y metrics, x-axis, grouping), run-table columns (``summary:``,
    ``config:``), filters and groupings. Other panel types are reported in ``unknown_panels``.

    Args:
        spec: the ``spec`` of :func:`payload`, or any part of it.
    """
    keys = ViewKeys() if keys is None else keys
    if isinstance(spec, list):
        for item in spec:
            view_keys(item, keys)
        return keys
    if not isinstance(spec, dict):
        return keys
    view_type = spec.get("viewType")
    if view_type == "Run History Line Plot":
        config = spec.get("config", {})
        if config.get("useMetricRegex"):
            keys.unknown_panels.add("line plot with a metric regex")
        keys.history.update(config.get("metrics") or [])
        if config.get("xAxis") not in (None, *BUILTIN_AXES):
            keys.history.add(config["xAxis"])
        if config.get("groupBy"):
            keys.config.add(_config_path(config["groupBy"]))
    elif view_type is not None and view_type not in KEYLESS_PANELS:
        keys.unknown_panels.add(view_type)
    if set(spec) == {"section", "name"}:  # a filter, grouping or sort key
        _add_key(keys, spec["section"], spec["name"])
    columns = spec.get("columnOrder")  # a run table's columns, e.g. "summary:final/tencrop/top1_err"
    for column in columns if isinstance(columns, list) else []:
        section, _, name = column.partition(":")
        _add_key(keys, section, name)
    for value in spec.values():
        view_keys(value, keys)
    return keys


def config_paths() -> set[str]:
    """Every dotted path of the W&B run config (the resolved config plus ``derived``)."""
    paths: set[str] = set()

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            paths.add(prefix + k)
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(to_dict(Config()), "")
    paths.update(f"derived.{f.name}" for f in dataclasses.fields(Derived))
    return paths


def unknown_keys(spec: Any) -> list[str]:
    """What a view names that the pipeline never logs (empty when the view is sound)."""
    keys = view_keys(spec)
    problems = [f"metric {k!r}" for k in sorted(keys.history - LOGGED_METRICS)]
    problems += [
        f"summary key {k!r}" for k in sorted(keys.summary - LOGGED_METRICS - set(FINAL_SUMMARY_METRICS))
    ]
    problems += [f"config key {k!r}" for k in sorted(keys.config - config_paths())]
    problems += [
        f"panel type {p!r} (teach pipeline.tracking.dashboard.view_keys its keys)"
        for p in sorted(keys.unknown_panels)
    ]
    return problems


# ---------------------------------------------------------------- serialising without network


def _report_model(report: Any) -> Any:
    """``report._to_model()`` without the network.

    The only server call before saving is each run set's project-id lookup (wandb-workspaces'
    ``Runset._to_model``); offline it is answered with a placeholder. Any other call fails.
    """
    from unittest import mock

    from wandb_workspaces.reports.v2 import gql
    from wandb_workspaces.reports.v2 import interface as wr_interface

    def lookup(_api: Any, query: Any, variables: dict[str, str]) -> dict[str, Any]:
        if query is not gql.projectInternalId:
            raise RuntimeError("wandb-workspaces made an unexpected server call while serialising a report")
        name = f"{variables['entityName']}/{variables['projectName']}"
        return {"project": {"internalId": f"<internal id of {name}, looked up on save>"}}

    with (
        mock.patch.object(wr_interface, "_get_api", lambda: None),
        mock.patch.object(wr_interface, "execute_graphql", lookup),
    ):
        return report._to_model()


def payload(view: Any) -> dict[str, Any]:
    """The ``upsertView`` request that ``save()`` sends for a workspace or report, as JSON data.

    Mirrors ``wandb_workspaces.workspaces.internal.upsert_view2`` (workspaces) and
    ``wandb_workspaces.reports.v2.Report.save`` (reports, ``draft=False``); the view's server
    name is generated on save and left out.
    """
    import wandb_workspaces.workspaces as ws

    if isinstance(view, ws.Workspace):
        model = view._to_model()
        fields = {"entityName": model.entity, "projectName": model.project, "displayName": model.display_name}
        fields.update(type="project-view", description="")
    else:
        model = _report_model(view)
        fields = {"entityName": model.project.entity_name, "projectName": model.project.name}
        fields.update(displayName=model.display_name, description=model.description, type="runs")
    return {**fields, "spec": json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True))}


# ---------------------------------------------------------------- saving


def save_blocker() -> str | None:
    """Why the view cannot be saved now (no API key, server unreachable), or None."""
    import wandb

    from pipeline.tracking.tracker import missing_credentials

    # The process-wide settings hold what the environment says (WANDB_BASE_URL, ...).
    settings = wandb.setup(settings=wandb.Settings(silent=True)).settings
    missing = missing_credentials(wandb)
    if missing is not None:
        return missing
    url = settings.base_url
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"the W&B server {url} cannot be reached ({type(e).__name__}: {e})"
    return None


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not _ENTITY.fullmatch(args.entity):
        hint = " (give the project with --project)" if "/" in args.entity else ""
        parser.error(
            f"--entity {args.entity!r}: a W&B user or team name has letters, digits and - _ . only{hint}"
        )
    if not _PROJECT.fullmatch(args.project):
        parser.error(f"--project {args.project!r}: must be non-empty, without any of / \\ # ? % :")
    if args.group is not None and not _GROUP.fullmatch(args.group):
        parser.error(f"--group {args.group!r}: must be non-empty, without quotes or backslashes")


def main(argv: list[str]) -> int:
    """``python -m pipeline dashboard``: build a W&B workspace or report; save it or print it.

    Args:
        argv: command-line arguments after ``dashboard``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline dashboard", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--entity", required=True, help="W&B user or team that owns the project")
    parser.add_argument(
        "--project",
        default=TrackingConfig.project,
        help="W&B project (default: %(default)s, tracking.project)",
    )
    parser.add_argument(
        "--group",
        help="only runs of this W&B group (tracking.group); degradation default: degradation-cifar10",
    )
    parser.add_argument(
        "--kind", choices=KINDS, default="training", help="which dashboard (default: %(default)s)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the view as JSON; do not save")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError as e:
        print(
            f"error: `dashboard` needs the optional package wandb-workspaces ({e}); install it with: {INSTALL}",
            file=sys.stderr,
        )
        return 2

    view = build_view(args.kind, args.entity, args.project, args.group)
    what = f"{args.kind} {'workspace' if args.kind == 'training' else 'report'}"
    data = payload(view)
    problems = unknown_keys(data["spec"])
    if problems:
        print(f"error: the {what} names keys the pipeline never logs: {', '.join(problems)}", file=sys.stderr)
        return 1
    text = json.dumps(data, indent=2)
    reason = None if args.dry_run else save_blocker()
    if args.dry_run or reason is not None:
        print(text)
        why = "--dry-run" if args.dry_run else f"not saved: {reason}"
        print(f"{why}; printed the {what} above as JSON (the request `save()` would send)", file=sys.stderr)
        return 0
    try:
        view.save()
        url = view.url
    except Exception as e:  # server refused (bad key, no such entity) or the network went away
        print(text)
        print(
            f"error: saving the {what} failed ({type(e).__name__}: {e}); its JSON is above", file=sys.stderr
        )
        return 1
    print(f"saved the {what}: {url}")
    return 0
