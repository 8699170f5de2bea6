"""``python -m pipeline dashboard``: every view names only keys the training loop really logs, and saving.

The training loop's logged keys are read back from a real one-epoch run's offline ``.wandb`` file.
Saving runs against a local stand-in for the W&B GraphQL server (no network here), which
records the ``upsertView`` request so that it can be compared with the ``--dry-run`` output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides

from pipeline.config import load_config, to_dict
from pipeline.report.paper import PAPER_RESULTS
from pipeline.tracking import dashboard
from pipeline.tracking.offline import read_wandb_history, read_wandb_records
from pipeline.tracking.tracker import FINAL_SUMMARY_METRICS, LOGGED_METRICS, OPTIONAL_METRICS

ROOT = Path(__file__).resolve().parents[1]
needs_workspaces = pytest.mark.skipif(
    importlib.util.find_spec("wandb_workspaces") is None,
    reason="wandb-workspaces not installed ('.[dashboards]')",
)


def _isolated_wandb_env(home: Path) -> dict[str, str]:
    """No key, no netrc, wandb's files in a throw-away HOME."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(home),
        NETRC=str(home / ".netrc"),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB__DISABLE_STATS="true",
        WANDB_SILENT="true",
    )
    return env


# ---------------------------------------------------------------- the training loop logs the list


@pytest.mark.slow
def test_engine_logs_exactly_the_metrics_tracking_lists(tiny_imagenet, tmp_path, monkeypatch):
    import wandb

    from pipeline.train.loop import train_worker

    for key, value in _isolated_wandb_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # a fresh wandb service that reads this environment
    overrides = tiny_overrides(tiny_imagenet, tmp_path, "keys")
    overrides += ["cluster.num_workers=1", "schedule.epochs=1", "tracking.log_every_n_steps=2"]
    summary = train_worker(to_dict(load_config(None, overrides)))
    (run_file,) = Path(summary["wandb_dir"]).glob("*.wandb")

    rows = read_wandb_history(run_file)
    assert any("train/step_loss" in row for row in rows) and any("val/top1_err" in row for row in rows)
    logged = {key for row in rows for key in row if not key.startswith("_")}  # _step, _runtime: wandb's
    assert logged <= LOGGED_METRICS, (
        f"logged but not in pipeline.tracking.tracker's lists: {logged - LOGGED_METRICS}"
    )
    missing = LOGGED_METRICS - set(OPTIONAL_METRICS) - logged
    assert not missing, f"listed in pipeline.tracking.tracker but never logged: {missing}"

    finals = set()
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            finals |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
    finals = {key for key in finals if key.startswith("final/")}
    assert finals == {"final/tencrop/top1_err", "final/tencrop/top5_err"}  # eval.final_mode=tencrop
    assert finals <= set(FINAL_SUMMARY_METRICS)


# ---------------------------------------------------------------- every view's keys


def _view(kind: str, group: str | None = None) -> dict[str, Any]:
    from pipeline.tracking.dashboard_views import build

    return dashboard.payload(build(kind, "my-team", "resnet-pipeline", group))


@needs_workspaces
def test_views_name_only_keys_the_pipeline_logs():
    views = {kind: _view(kind) for kind in dashboard.KINDS}
    for kind, data in views.items():
        assert dashboard.unknown_keys(data["spec"]) == [], kind
    training, degradation, tables = (
        dashboard.view_keys(views[k]["spec"]) for k in ("training", "degradation", "imagenet-tables")
    )

    # The training workspace charts every logged metric (`step` is W&B's own x-axis there).
    assert training.history == LOGGED_METRICS - {"step"}
    assert training.summary == set(FINAL_SUMMARY_METRICS)
    assert {"tracking.group", "derived.world_size", "optim.batch_size"} <= training.config
    assert views["training"]["type"] == "project-view"

    assert degradation.history == {"train/top1_err", "val/top1_err"}
    assert "model.name" in degradation.config  # one line (and colour) per network
    assert tables.summary == {
        f"final/{m}/{e}" for m in ("tencrop", "multiscale") for e in ("top1_err", "top5_err")
    }
    assert views["degradation"]["type"] == views["imagenet-tables"]["type"] == "runs"


@needs_workspaces
def test_degradation_report_is_figure_6_plain_vs_residual():
    data = _view("degradation")  # default group: what `make degradation` sets
    grids = [b for b in data["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 2
    filters = [g["metadata"]["runSets"][0]["filters"]["filters"] for g in grids]
    for grid_filters in filters:
        assert grid_filters[0]["key"] == {"section": "run", "name": "group"}
        assert grid_filters[0]["value"] == ["degradation-cifar10"]
    plain, residual = (set(f[1]["value"]) for f in filters)
    assert {"cifar_plain20", "cifar_plain56"} <= plain and not plain & {"cifar_resnet20", "cifar_resnet56"}
    assert {"cifar_resnet20", "cifar_resnet56"} <= residual and not residual & {"cifar_plain20"}
    for grid in grids:
        (plot,) = grid["metadata"]["panelBankSectionConfig"]["panels"]
        config = plot["config"]
        assert config["xAxis"] == "_step"  # iterations, like the paper
        assert (config["groupBy"], config["groupAgg"], config["groupArea"]) == (
            "model.value.name",
            "mean",
            "minmax",
        )
    assert _view("degradation", "my-seeds")["displayName"].endswith("(my-seeds)")


@needs_workspaces
def test_imagenet_tables_report_carries_the_papers_numbers():
    text = json.dumps(_view("imagenet-tables", "imagenet-table3"))
    for row in PAPER_RESULTS:
        if row.eval in ("tencrop", "multiscale"):
            assert f"| {row.label} | `{row.model}` | {row.eval} | {row.top1:.2f} |" in text
    assert "cifar_resnet56" not in text and "imagenet-table3" in text


@needs_workspaces
def test_checker_catches_renamed_metrics_unknown_panels_and_config_keys(monkeypatch, capsys):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    bad = ws.Workspace(
        entity="e",
        project="p",
        sections=[
            ws.Section(
                name="s",
                panels=[wr.LinePlot(x="epochs", y=["val/top1_error"]), wr.ScalarChart(metric="lr")],
            )
        ],
        runset_settings=ws.RunsetSettings(
            pinned_columns=["config:model.value.nam", "summary:final/tencrop/top1"]
        ),
    )
    problems = dashboard.unknown_keys(dashboard.payload(bad)["spec"])
    for expected in ("'val/top1_error'", "'epochs'", "'model.nam'", "'final/tencrop/top1'", "'Scalar Chart'"):
        assert any(expected in p for p in problems), (expected, problems)

    # A metric renamed in pipeline.tracking.tracker (here: dropped from its list) stops the command.
    monkeypatch.setattr(dashboard, "LOGGED_METRICS", LOGGED_METRICS - {"val/top1_err"})
    assert dashboard.main(["--entity", "e", "--kind", "degradation", "--dry-run"]) == 1
    assert "'val/top1_err'" in capsys.readouterr().err


# ---------------------------------------------------------------- the command line


@needs_workspaces
def test_dry_run_prints_the_report_as_json(capsys):
    assert dashboard.main(["--entity", "my-team", "--kind", "imagenet-tables", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert (data["entityName"], data["projectName"], data["type"]) == ("my-team", "resnet-pipeline", "runs")
    assert "--dry-run" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--entity"),
        (["--entity", "e", "--kind", "curves"], "invalid choice: 'curves'"),
        (["--entity", "my-team/resnet-pipeline"], "give the project with --project"),
        (["--entity", "e", "--project", ""], "--project ''"),
        (["--entity", "e", "--project", "my-team/resnet-pipeline"], "without any of /"),
        (["--entity", "e", "--group", "it's"], "--group"),
    ],
)
def test_bad_arguments_exit_2_before_anything_else(argv, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # argument errors come first
    with pytest.raises(SystemExit) as exit_:
        dashboard.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_without_wandb_workspaces_it_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails as if not installed
    assert dashboard.main(["--entity", "e", "--kind", "training"]) == 2
    assert "pip install -e '.[dashboards]'" in capsys.readouterr().err


def _dashboard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # A separate process: logging in to W&B is process-wide state.
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "dashboard", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_workspaces
def test_without_key_or_server_it_prints_the_json_and_says_why(tmp_path):
    env = _isolated_wandb_env(tmp_path / "home")
    no_key = _dashboard(env, "--entity", "e", "--kind", "degradation")
    assert no_key.returncode == 0, no_key.stderr
    assert json.loads(no_key.stdout)["type"] == "runs"
    assert "not saved: no W&B API key" in no_key.stderr

    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}")
    no_server = _dashboard(env, "--entity", "e", "--kind", "training")
    assert no_server.returncode == 0, no_server.stderr
    assert json.loads(no_server.stdout)["type"] == "project-view"
    assert f"not saved: the W&B server {env['WANDB_BASE_URL']} cannot be reached" in no_server.stderr


class _FakeWandb(BaseHTTPRequestHandler):
    """Just enough of W&B's GraphQL API for ``wandb.Api()`` and the two ``save()`` calls."""

    requests: list[dict[str, Any]]
    refuse_upsert = False  # answer upsertView with a GraphQL error, as for a key without access

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        data: dict[str, Any] = {}
        if self.path == "/graphql":
            request = json.loads(body)
            self.requests.append(request)
            query, v = request["query"], request.get("variables") or {}
            if "viewer" in query:
                data = {"viewer": {"id": "1", "entity": "e", "username": "u", "email": "", "flags": "{}", "teams": {"edges": []}}}  # fmt: skip
            elif "ProjectInternalId" in query:
                data = {"project": {"id": "p1", "internalId": "42"}}
            elif "GetProjects" in query:
                node = {"__typename": "Project", "id": "p1", "name": "resnet-pipeline", "entityName": "e",
                        "createdAt": "2026-01-01T00:00:00", "isBenchmark": False, "user": None}  # fmt: skip
                data = {"models": {"pageInfo": {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False}, "edges": [{"node": node}]}}  # fmt: skip
            elif "upsertView" in query:
                view = {"id": "VmlldzoxMjM=", "name": v.get("name") or "nw-abc-v", "type": v["type"], "spec": v["spec"],
                        "displayName": v["displayName"], "description": v["description"], "updatedAt": "2026-01-01T00:00:00",
                        "project": {"id": "p1", "name": v["projectName"], "entityName": v["entityName"]}}  # fmt: skip
                data = {"upsertView": {"inserted": True, "view": view}}
                if self.refuse_upsert:
                    data = {"errors": [{"message": "permission denied", "path": ["upsertView"]}]}
        reply = json.dumps(data if "errors" in data else {"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def _without_ids(value: Any) -> Any:
    # Panel and run-set ids are random per build; the project id is the server's.
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "__id__")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def _against_fake_wandb(tmp_path: Path, *args: str, refuse: bool = False) -> tuple[Any, Any, int]:
    handler = type("Handler", (_FakeWandb,), {"requests": [], "refuse_upsert": refuse})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = _isolated_wandb_env(tmp_path / "home")
        env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}")
        return _dashboard(env, "--entity", "e", *args), handler.requests, server.server_port
    finally:
        server.shutdown()


@needs_workspaces
@pytest.mark.parametrize("kind", ["training", "degradation"])
def test_save_sends_what_dry_run_prints(kind, tmp_path):
    result, requests, port = _against_fake_wandb(tmp_path, "--kind", kind, "--group", "g1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"saved the {kind} " in result.stdout and f"http://127.0.0.1:{port}/e/" in result.stdout
    (sent,) = [r["variables"] for r in requests if "upsertView" in r["query"]]

    from pipeline.tracking.dashboard_views import build

    expected = dashboard.payload(build(kind, "e", "resnet-pipeline", "g1"))
    for field in ("entityName", "projectName", "displayName", "type", "description"):
        assert sent[field] == expected[field], field
    assert _without_ids(json.loads(sent["spec"])) == _without_ids(expected["spec"])


@needs_workspaces
def test_a_refused_save_exits_1_and_still_prints_the_json(tmp_path):
    result, requests, _ = _against_fake_wandb(tmp_path, "--kind", "training", refuse=True)
    assert result.returncode == 1
    assert (
        "error: saving the training workspace failed" in result.stderr
        and "permission denied" in result.stderr
    )
    assert json.loads(result.stdout)["type"] == "project-view"
    assert any("upsertView" in r["query"] for r in requests)
