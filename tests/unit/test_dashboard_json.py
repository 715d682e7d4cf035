"""The Grafana dashboard's shape, without Grafana: what an import needs and what keeps the
panels readable. Whether its queries return data: tests/integration/test_dashboard.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "artserve-dashboard.json"


def _load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_importable_with_a_datasource_and_model_variable():
    dashboard = _load()
    assert dashboard["uid"] == "artserve" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".*"


def test_panels_are_laid_out_without_overlap_and_query_ray_metrics():
    panels = _load()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["description"], panel["title"]
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            expr = target["expr"]
            assert re.search(r"\bray_(serve|artserve)_\w+", expr), expr  # Ray's names, as exported
            # Every rate window follows Grafana's interval, never a fixed one.
            assert re.findall(r"\[[^\]]*\]", expr) == ["[$__rate_interval]"] * expr.count("["), expr
            if "artserve_" in expr:
                assert 'model=~"$model"' in expr, expr


def test_the_panels_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in _load()["panels"])
    for needed in ["responses by model and status", "errors", "images per second", "latency", "queue wait",
                   "batch size", "step time", "pipeline", "encode and store", "replicas per model", "cancelled"]:
        assert needed in titles, needed
