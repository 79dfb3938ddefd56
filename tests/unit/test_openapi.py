"""The OpenAPI documents list every route of their app, and are valid OpenAPI 3.1."""

from __future__ import annotations

import pytest
import schemathesis
from openapi_spec_validator import validate
from starlette.routing import Route

from sidecar.agent import Sidecar
from sidecar.agent.app import create_sidecar_app, sidecar_openapi
from sidecar.controller.api import controller_openapi, create_controller_app
from sidecar.controller.settings import ControllerSettings
from sidecar.httpkit import STATUS_BY_KIND
from tests.harness.stores import tiny_layout
from vllm_kvmove.config import build_config
from vllm_kvmove.store import ChunkStore


def _sidecar_app():
    layout = tiny_layout()
    cfg = build_config({"instance_id": "doc", "chunk_size": layout.chunk_size})
    return create_sidecar_app(Sidecar(cfg, ChunkStore(layout, 2 * layout.chunk_bytes), layout))


APPS = {"controller": (lambda: create_controller_app(ControllerSettings()), controller_openapi),
        "sidecar": (_sidecar_app, sidecar_openapi)}


def _routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {route!r}"
        for method in route.methods or {"GET"}:
            if method != "HEAD":  # Starlette adds HEAD to every GET route
                out.add((method, route.path))
    return out


def _documented(doc) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item}


@pytest.mark.parametrize("name", APPS)
def test_every_route_is_documented_and_nothing_else(name):
    make_app, document = APPS[name]
    routes, documented = _routes(make_app()), _documented(document())
    assert routes - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routes == set(), "documented operations that the app does not serve"


@pytest.mark.parametrize("name", APPS)
def test_document_is_valid_openapi_and_loads_in_schemathesis(name):
    doc = APPS[name][1]()
    validate(doc)  # OpenAPI 3.1 meta-schema, $refs resolved
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"] and doc["info"]["version"]
    schema = schemathesis.openapi.from_dict(doc)
    ops = [r.ok() for r in schema.get_all_operations()]  # raises on an operation it cannot use
    assert len(ops) == len(_documented(doc))


@pytest.mark.parametrize("name", APPS)
def test_error_responses_use_the_envelope_and_known_statuses(name):
    doc = APPS[name][1]()
    statuses = {str(s) for s in STATUS_BY_KIND.values()}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"], (method, path)
            for status, resp in op["responses"].items():
                if status != "200":
                    assert status in statuses, (method, path, status)
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}
            if "requestBody" in op:
                assert op["requestBody"]["required"] is True
                assert {"400", "413", "415"} <= set(op["responses"]), (method, path)


def test_key_shapes_of_the_controller_document():
    paths = controller_openapi()["paths"]
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    ok = lambda m, p, mt="application/json": paths[p][m]["responses"]["200"]["content"][mt]["schema"]  # noqa: E731
    # At once, the job's id; with ?wait, the job's status.
    assert ok("post", "/move") == {"anyOf": [ref("MoveResponse"), ref("JobStatusBody")]}
    assert ok("post", "/drain") == {"anyOf": [ref("DrainResponse"), ref("JobStatusBody")]}
    assert ok("get", "/events/{event_id}") == ok("post", "/check_finish") == ref("JobStatusBody")
    assert ok("post", "/lookup") == ref("LookupResponse")
    assert ok("post", "/pin") == ok("post", "/unpin") == ok("post", "/clear") == ref("StoreOpResponse")
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert paths["/move"]["post"]["requestBody"]["content"]["application/json"]["schema"] == ref("MoveRequest")
    limit = paths["/events"]["get"]["parameters"][0]
    assert limit["in"] == "query" and limit["schema"] == {"type": "integer", "minimum": 0}
    schemas = controller_openapi()["components"]["schemas"]
    assert set(schemas["LookupResponse"]["required"]) == {"event_id", "layout_info"}
    sc = sidecar_openapi()["paths"]["/chunks/{key}"]["get"]
    assert "application/octet-stream" in sc["responses"]["200"]["content"]
    assert sc["parameters"][0]["schema"]["pattern"] == "^[0-9a-fA-F]{32}$"
