"""Promise 1: bad input never reaches a 5xx.

The controller (a real process) and a sidecar (real, in-process, with its real store and NIXL
agent) serve their OpenAPI documents at ``/openapi.json``. Schemathesis loads them from there
and fuzzes every operation over HTTP (property-based: hypothesis generates bodies, path and
query parameters, valid and invalid). No response may be >= 500, every 4xx must carry the JSON
error envelope with a message, and responses must conform to the documents.

Hand-written cases cover what a schema fuzzer misses: token ids that are not ints, negative or
huge, a 1,000,001-token list, unknown instances and locations, source = destination, a 10 MB
body, wrong content types, invalid UTF-8, non-object JSON, empty bodies, trailing garbage,
deeply nested JSON, and the sidecar's chunk keys and limits. Each asserts the status, the error
message, and that no store changed.

State: the fuzzer is steered towards two instances of its own (``fuzz-a``, ``fuzz-b``; it may
move, drain, pin and clear their chunks: that is legitimate), and the hand-written cases use two others
(``hand-src``, ``hand-dst``) that no fuzzed request names. A fake engine answers ``/tokenize``
so prompts are tokenized as they would be in production (no vLLM is started).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from sidecar.httpkit import STATUS_BY_KIND
from sidecar.agent.app import sidecar_openapi
from sidecar.protocol import FINAL_STATES
from sidecar.controller.api import controller_openapi
from tests.harness.api import LOC
from tests.harness.processes import free_port
from tests.harness.stores import put_chunk
from vllm_kvmove.hashing import chunk_spans

FUZZ_IDS = ("fuzz-a", "fuzz-b")
HAND_SRC, HAND_DST = "hand-src", "hand-dst"
FUZZ_TOKENS = list(range(7000, 7100))  # 3 full chunks + a 4-token tail at fuzz-a
HAND_TOKENS = list(range(8000, 8100))  # the same shape at hand-src
# Not JSON APIs: the status page and Prometheus text.
EXCLUDED = {("GET", "/"), ("GET", "/metrics")}
MAX_EXAMPLES = 60  # per operation and generation mode


# ---------------------------------------------------------------------------------------------
# The world: fleet + fake engine + four sidecars with data
# ---------------------------------------------------------------------------------------------
class FakeEngine:
    """vLLM's ``POST /tokenize``: token ids are the prompt's UTF-8 bytes."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                tokens = list(body["prompt"].encode("utf-8", "surrogatepass"))
                out = json.dumps({"count": len(tokens), "max_model_len": 1 << 20,
                                  "tokens": tokens}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def refill(sidecar, tokens, seed: int) -> list[bytes]:
    """Make the sidecar hold every chunk of ``tokens`` (writing only the missing ones)."""
    spans = chunk_spans(tokens, sidecar.layout.chunk_size, sidecar.fingerprint)
    for i, s in enumerate(spans):
        if not sidecar.store.contains(s.key):
            put_chunk(sidecar.store, s.key, s.num_tokens, seed + i)
    return [s.key for s in spans]


@dataclass
class World:
    fleet: object
    engine: FakeEngine
    event_id: str  # a finished job's id (the fuzzer asks about it, among random ones)
    fuzz_keys: list[bytes]

    @property
    def controller_url(self) -> str:
        return str(self.fleet.http.base_url).rstrip("/")

    def sidecar_url(self, instance_id: str) -> str:
        return self.fleet.sidecars[instance_id].sidecar_url

    def snapshots(self) -> dict:
        return {iid: sc.store.snapshot() for iid, sc in self.fleet.sidecars.items()}

    def quiesce(self, timeout: float = 20) -> None:
        """Wait until no job is pending or running (a fuzzed move may still be)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            events = self.fleet.http.get("/events", params={"limit": 100000}).json()["events"]
            if all(e["status"] in FINAL_STATES for e in events):
                return
            time.sleep(0.02)
        raise AssertionError("jobs still running")


@pytest.fixture(scope="module")
def world(fleet):
    engine = FakeEngine()
    for iid in (*FUZZ_IDS, HAND_SRC, HAND_DST):
        fleet.add_sidecar(iid, engine_url=engine.url)
    hand_keys = refill(fleet.sidecars[HAND_SRC], HAND_TOKENS, seed=1)
    fuzz_keys = refill(fleet.sidecars[FUZZ_IDS[0]], FUZZ_TOKENS, seed=2)
    assert fleet.wait_lookup(HAND_TOKENS, {HAND_SRC: 100}) == {HAND_SRC: 100}
    assert fleet.wait_lookup(FUZZ_TOKENS, {FUZZ_IDS[0]: 100}) == {FUZZ_IDS[0]: 100}
    r = fleet.http.post("/move", json={"old_position": [FUZZ_IDS[0], LOC],
                                       "new_position": [FUZZ_IDS[1], LOC],
                                       "tokens": FUZZ_TOKENS, "copy": True})
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
    assert len(hand_keys) == 4
    try:
        yield World(fleet, engine, r.json()["event_id"], fuzz_keys)
    finally:
        engine.close()


def assert_error(r, status: int, needle: str = "") -> dict:
    """``r`` is a ``status`` JSON error envelope with a non-empty message (containing ``needle``)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert STATUS_BY_KIND[err["kind"]] == status, err
    assert needle.lower() in err["message"].lower(), err
    return err


# ---------------------------------------------------------------------------------------------
# Hand-written cases: the controller
# ---------------------------------------------------------------------------------------------
def _move(**over) -> dict:
    return {"old_position": [HAND_SRC, LOC], "new_position": [HAND_DST, LOC],
            "tokens": HAND_TOKENS, **over}


BAD_JSON_BODIES = [
    # tokens that are not ints
    ("/move", _move(tokens=["1", "2"]), 400, "tokens"),
    ("/move", _move(tokens=[1.5]), 400, "tokens"),
    ("/move", _move(tokens=[8000.0]), 400, "tokens"),
    ("/move", _move(tokens=[[8000]]), 400, "tokens"),
    ("/move", _move(tokens=[None]), 400, "tokens"),
    ("/move", _move(tokens=[True, False]), 400, "tokens"),
    ("/move", _move(tokens="8000 8001"), 400, "tokens"),
    ("/move", _move(tokens={"0": 8000}), 400, "tokens"),
    ("/lookup", {"tokens": ["a"]}, 400, "tokens"),
    ("/pin", {"instance_id": HAND_SRC, "tokens": [1.0]}, 400, "tokens"),
    # negative ids, ids >= 2**31
    ("/move", _move(tokens=[-1]), 400, "token id"),
    ("/move", _move(tokens=HAND_TOKENS + [-(2 ** 63)]), 400, "token id"),
    ("/move", _move(tokens=[2 ** 31]), 400, "token id"),
    ("/move", _move(tokens=[2 ** 63]), 400, "token id"),
    ("/move", _move(tokens=[2 ** 64]), 400, "token id"),
    ("/move", _move(tokens=[10 ** 40]), 400, "token id"),
    ("/lookup", {"tokens": [2 ** 31]}, 400, "token id"),
    ("/pin", {"instance_id": HAND_SRC, "tokens": [-5]}, 400, "token id"),
    ("/clear", {"instance_id": HAND_SRC, "tokens": [2 ** 40]}, 400, "token id"),
    ("/move", _move(tokens=[]), 400, "empty"),
    ("/move", _move(tokens=None, prompt=""), 400, "empty"),
    ("/move", _move(prompt="both"), 400, "exactly one"),
    # unknown instance / location, source = destination
    ("/move", _move(old_position=["nope", LOC]), 404, "unknown instance"),
    ("/move", _move(new_position=["nope", LOC]), 404, "unknown instance"),
    ("/move", _move(old_position=["", LOC]), 404, "unknown instance"),
    ("/move", _move(old_position=[HAND_SRC, "LocalDiskBackend"]), 400, "location"),
    ("/move", _move(new_position=[HAND_DST, ""]), 400, "location"),
    ("/move", _move(new_position=[HAND_SRC, LOC]), 400, "same instance"),
    ("/move", _move(new_position=[HAND_SRC, LOC], copy=True), 400, "same instance"),
    ("/move", _move(old_position=[HAND_SRC]), 400, "old_position"),
    ("/move", _move(old_position=[HAND_SRC, LOC, "x"]), 400, "old_position"),
    ("/move", _move(old_position=HAND_SRC), 400, "old_position"),
    ("/pin", {"instance_id": "nope", "tokens": HAND_TOKENS}, 404, "unknown instance"),
    ("/pin", {"instance_id": HAND_SRC, "location": "GPU", "tokens": HAND_TOKENS}, 400, "location"),
    ("/unpin", {"instance_id": HAND_SRC}, 400, "exactly one"),
    ("/clear", {"instance_id": "nope"}, 404, "unknown instance"),
    ("/clear", {"instance_id": HAND_SRC, "location": "Disk"}, 400, "location"),
    ("/clear", {"location": LOC}, 400, "instance_id"),
    ("/lookup", {"tokens": HAND_TOKENS, "prompt": "x"}, 400, "exactly one"),
    ("/lookup", {"prompt": "hello", "instance_id": "nope"}, 404, "unknown instance"),
    ("/health", {"instance_id": "nope"}, 404, "unknown instance"),
    ("/health", {"instance_id": 7}, 400, "instance_id"),
    ("/query_worker_info", {"instance_id": "nope"}, 404, "unknown instance"),
    ("/query_worker_info", {"instance_id": HAND_SRC, "worker_ids": ["0"]}, 400, "worker_ids"),
    ("/check_finish", {"event_id": 5}, 400, "event_id"),
    ("/check_finish", {"event_id": "nope"}, 404, "unknown event_id"),
    ("/check_finish", {}, 400, "event_id"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD_JSON_BODIES,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_JSON_BODIES)])
def test_bad_json_bodies_get_a_4xx_and_change_nothing(world, path, body, status, needle):
    before = world.snapshots()
    assert_error(world.fleet.http.post(path, json=body), status, needle)
    assert world.snapshots() == before


MOVE_JSON = json.dumps(_move()).encode()
NESTED = 100_000
BAD_RAW_BODIES = [
    # invalid UTF-8, in a value and in a key
    (MOVE_JSON.replace(b'"hand-src"', b'"hand-\xff\xfe"'), 400, "utf-8"),
    (b'{"\xc3\x28": 1, ' + MOVE_JSON[1:], 400, "utf-8"),
    (b'{"old_position": ["\\ud800", "LocalCPUBackend"]}', 400, "malformed"),
    # JSON that is not an object
    (b"[]", 400, "object"), (b"[1, 2]", 400, "object"), (b'"move"', 400, "object"),
    (b"42", 400, "object"), (b"null", 400, "object"), (b"true", 400, "object"),
    # empty, blank, truncated, trailing garbage, not JSON at all
    (b"", 400, "empty"), (b"   \n", 400, ""), (MOVE_JSON[:-1], 400, "malformed"),
    (MOVE_JSON + b" garbage", 400, "malformed"), (MOVE_JSON + MOVE_JSON, 400, "malformed"),
    (MOVE_JSON + b"\x00", 400, "malformed"), (b"\xef\xbb\xbf" + MOVE_JSON, 400, "malformed"),
    (b"{not json", 400, "malformed"), (b"NaN", 400, "malformed"),
    (MOVE_JSON.replace(b"8000", b"NaN", 1), 400, "malformed"),
    (MOVE_JSON.replace(b"8000", b"1e400", 1), 400, "tokens"),
    # deeply nested JSON: in a typed field, in an ignored field, at the top
    (b'{"tokens": ' + b"[" * NESTED + b"]" * NESTED + b"}", 400, "tokens"),
    (b'{"x": ' + b"[" * NESTED + b"]" * NESTED + b", " + MOVE_JSON[1:], 400, "deep"),
    (b'{"x": ' + b'{"a": ' * NESTED + b"1" + b"}" * NESTED + b", " + MOVE_JSON[1:], 400, "deep"),
    (b"[" * NESTED + b"]" * NESTED, 400, "object"),
    (b"[" * NESTED, 400, ""),
]


@pytest.mark.parametrize("raw,status,needle", BAD_RAW_BODIES,
                         ids=[f"raw-{i}" for i in range(len(BAD_RAW_BODIES))])
@pytest.mark.parametrize("path", ["/move", "/pin", "/lookup"])
def test_malformed_bodies_get_a_400_and_change_nothing(world, path, raw, status, needle):
    before = world.snapshots()
    r = world.fleet.http.post(path, content=raw, headers={"content-type": "application/json"})
    if path != "/move" and needle not in ("empty", "utf-8", "deep"):
        needle = ""  # another body type: msgspec may name one of its own fields first
    assert_error(r, status, needle)
    assert world.snapshots() == before


def test_a_million_and_one_tokens_is_a_quick_400(world):
    tokens = HAND_TOKENS * 10_000 + [1]  # 1,000,001 ids, every one valid on its own
    for path, body in (("/move", _move(tokens=tokens)), ("/lookup", {"tokens": tokens}),
                       ("/pin", {"instance_id": HAND_SRC, "tokens": tokens})):
        before = world.snapshots()
        t0 = time.monotonic()
        r = world.fleet.http.post(path, json=body, timeout=30)
        elapsed = time.monotonic() - t0
        assert_error(r, 400, "1000001")
        assert elapsed < 10, f"{path}: {elapsed:.1f} s"
        assert world.snapshots() == before


def test_a_million_tokens_is_still_served(world):
    tokens = HAND_TOKENS * 10_000  # exactly the limit; starts with what hand-src holds
    t0 = time.monotonic()
    r = world.fleet.http.post("/lookup", json={"tokens": tokens}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    # the first 3 chunks match; the 4th differs from hand-src's 4-token tail chunk
    assert r.json()["layout_info"] == {HAND_SRC: [LOC, 96]}
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/move", "/lookup", "/check_finish"])
def test_a_10_mb_body_is_a_413(world, path, chunked):
    before = world.snapshots()
    raw = b'{"tokens": [' + b"1," * (5 * 1024 * 1024) + b"1]}"  # 10 MiB of valid JSON
    content = (raw[i:i + 65536] for i in range(0, len(raw), 65536)) if chunked else raw
    r = world.fleet.http.post(path, content=content, headers={"content-type": "application/json"})
    assert_error(r, 413, "larger than")
    assert world.snapshots() == before


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/xml",
                                   "application/jsonx", "application/json-patch+json",
                                   "application/octet-stream", "*/*"])
@pytest.mark.parametrize("path", ["/move", "/pin", "/clear", "/lookup", "/check_finish",
                                  "/health", "/query_worker_info"])
def test_wrong_content_type_is_a_415(world, path, ctype):
    before = world.snapshots()
    r = world.fleet.http.post(path, content=MOVE_JSON, headers={"content-type": ctype})
    assert_error(r, 415, "application/json")
    assert world.snapshots() == before


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON",
                                   "application/json ; charset=UTF-8"])
def test_json_content_type_variants_are_accepted(world, ctype):
    body = json.dumps({"tokens": HAND_TOKENS}).encode()
    r = world.fleet.http.post("/lookup", content=body, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["layout_info"] == {HAND_SRC: [LOC, 100]}


@pytest.mark.parametrize("query,status", [("limit=-1", 400), ("limit=x", 400), ("limit=1.5", 400),
                                          ("limit=", 400), ("limit=%C2%B2", 400),  # "²": isdigit()
                                          ("limit=1e3", 400), ("limit=0x10", 400),
                                          ("limit=99999999999999999999999999", 200),
                                          ("limit=0", 200), ("limit=%20", 400)])
def test_events_limit(world, query, status):
    r = world.fleet.http.get(f"/events?{query}")
    if status == 200:
        assert r.status_code == 200 and isinstance(r.json()["events"], list), r.text
    else:
        assert_error(r, status, "limit")


@pytest.mark.parametrize("event_id", ["nope", "%00", "%FF%FE", "a" * 5000, "..%2F..%2Fetc",
                                      "%F0%9F%92%A9", "null", "-1", str(2 ** 70)])
def test_unknown_event_ids_are_404(world, event_id):
    assert_error(world.fleet.http.get(f"/events/{event_id}"), 404)


@pytest.mark.parametrize("method,path,status", [("POST", "/events", 405), ("DELETE", "/move", 405),
                                                ("GET", "/move", 405), ("PUT", "/pin", 405),
                                                ("GET", "/nope", 404), ("POST", "/", 405)])
def test_wrong_method_or_route_gets_the_envelope(world, method, path, status):
    r = world.fleet.http.request(method, path)
    assert_error(r, status)
    if status == 405:
        assert r.headers.get("allow"), "405 must say which methods are allowed (RFC 9110)"


def test_the_hand_data_is_intact(world):
    """After all the above, hand-src still holds its prefix."""
    assert world.fleet.wait_lookup(HAND_TOKENS, {HAND_SRC: 100}) == {HAND_SRC: 100}


# ---------------------------------------------------------------------------------------------
# Hand-written cases: the sidecar's HTTP app
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,status", [
    ("00", 400), ("0" * 31, 400), ("0" * 33, 400), ("zz" * 16, 400), ("0" * 64, 400),
    ("%00" * 16, 400), ("%D9%A0" * 32, 400),  # 32 Arabic-Indic zeros
    ("0" * 30 + "%20%20", 400), ("-" + "0" * 31, 400), ("0" * 32, 404), ("F" * 32, 404)])
def test_sidecar_bad_chunk_keys(world, key, status):
    before = world.snapshots()
    r = requests.get(f"{world.sidecar_url(HAND_SRC)}/chunks/{key}", timeout=10)
    assert_error(r, status, "chunk")
    assert world.snapshots() == before


def test_sidecar_serves_a_held_chunk(world):
    key = world.fleet.sidecars[HAND_SRC].store.snapshot()[1][0][0]
    r = requests.get(f"{world.sidecar_url(HAND_SRC)}/chunks/{key.hex().upper()}", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["x-kvmove-num-tokens"]) == 32 and r.content


@pytest.mark.parametrize("limit,status", [("-1", 400), ("x", 400), ("1.5", 400), ("", 400),
                                          ("%C2%B2", 400), ("%D9%A1", 400), ("1e3", 400),
                                          ("9" * 40, 200), ("0", 200), ("2", 200)])
def test_sidecar_bad_limit(world, limit, status):
    r = requests.get(f"{world.sidecar_url(HAND_SRC)}/chunks?limit={limit}", timeout=10)
    if status == 200:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == 4 and len(body["chunks"]) == min(4, int(limit))
    else:
        assert_error(r, status, "limit")


# ---------------------------------------------------------------------------------------------
# The fuzz run
# ---------------------------------------------------------------------------------------------
@schemathesis.check
def error_envelope_with_message(ctx, response, case) -> None:
    """Every 4xx is the JSON error envelope, with a non-empty message and a kind that maps to
    the status."""
    if not 400 <= response.status_code < 500:
        return None
    assert "application/json" in response.headers.get("content-type", [""])[0], \
        f"{response.status_code} is not JSON: {response.content[:200]!r}"
    err = json.loads(response.content)["error"]
    assert isinstance(err["message"], str) and err["message"].strip(), f"no message: {err}"
    assert STATUS_BY_KIND.get(err["kind"]) == response.status_code, f"kind/status mismatch: {err}"
    return None


CHECKS = [not_a_server_error, error_envelope_with_message, status_code_conformance,
          content_type_conformance, response_schema_conformance, response_headers_conformance,
          negative_data_rejection]


def _operations(doc) -> list[tuple[str, str]]:
    return [(m.upper(), p) for p, item in doc["paths"].items() for m in item
            if (m.upper(), p) not in EXCLUDED]


def _steer(world: World, case, use_ids: bool, src: str, dst: str, prefix: int, known: bool):
    """Point a positive case at the fuzz instances, their tokens and a real job (sometimes), so
    the fuzzer gets past "unknown instance" into the store operations and moves."""
    if isinstance(case.body, dict) and use_ids:
        body = dict(case.body)
        if "old_position" in body:
            body["old_position"], body["new_position"] = [src, LOC], [dst, LOC]
        if "instance_id" in body:
            body["instance_id"] = src
        if case.path == "/drain":  # not to every instance (its default): the hand ones too
            body["to"] = [dst]
        if "location" in body:
            body["location"] = LOC
        if isinstance(body.get("tokens"), list):
            body["tokens"] = FUZZ_TOKENS[:prefix]
        if "event_id" in body:
            body["event_id"] = world.event_id
        case.body = body
    if known and "event_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "event_id": world.event_id}
    if known and "key" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "key": world.fuzz_keys[prefix % 4].hex()}
    return case


def fuzz(world: World, schema, method: str, path: str, base_url: str, counts: dict, app: str):
    operation = schema[path][method]
    spec = operation.definition.raw
    steering = st.tuples(st.booleans(), st.sampled_from(FUZZ_IDS), st.sampled_from(FUZZ_IDS),
                         st.integers(1, len(FUZZ_TOKENS)), st.booleans())
    strategies = [operation.as_strategy(GenerationMode.POSITIVE).flatmap(
        lambda case: steering.map(lambda s: _steer(world, case, *s)))]
    if spec.get("parameters") or spec.get("requestBody"):  # else nothing to make invalid
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    session = requests.Session()

    @settings(max_examples=MAX_EXAMPLES * len(strategies), deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=st.one_of(strategies))
    def run(case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        counts[app, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    try:
        run()
    finally:
        session.close()


@pytest.fixture(scope="module")
def controller_schema(world):
    return schemathesis.openapi.from_url(f"{world.controller_url}/openapi.json")


@pytest.fixture(scope="module")
def sidecar_schema(world):
    return schemathesis.openapi.from_url(f"{world.sidecar_url(FUZZ_IDS[0])}/openapi.json")


@pytest.mark.parametrize("method,path", _operations(controller_openapi()))
def test_fuzz_controller(world, controller_schema, fuzz_cases, method, path):
    refill(world.fleet.sidecars[FUZZ_IDS[0]], FUZZ_TOKENS, seed=2)
    hand_before = {i: s for i, s in world.snapshots().items() if i.startswith("hand-")}
    fuzz(world, controller_schema, method, path, world.controller_url, fuzz_cases, "controller")
    world.quiesce()
    assert {i: s for i, s in world.snapshots().items() if i.startswith("hand-")} == hand_before


@pytest.mark.parametrize("method,path", _operations(sidecar_openapi()))
def test_fuzz_sidecar(world, sidecar_schema, fuzz_cases, method, path):
    refill(world.fleet.sidecars[FUZZ_IDS[0]], FUZZ_TOKENS, seed=2)
    fuzz(world, sidecar_schema, method, path, world.sidecar_url(FUZZ_IDS[0]), fuzz_cases, "sidecar")


def test_fuzz_ran_and_everything_is_still_up(world, fuzz_cases):
    runs = {app: sum(n for (a, _), n in fuzz_cases.items() if a == app)
            for app in ("controller", "sidecar")}
    if not any(runs.values()):
        pytest.skip("no fuzz test was selected")
    print(f"\nfuzz cases run: {runs}; by status: {dict(sorted(fuzz_cases.items()))}")
    assert runs["controller"] >= 10 * len(_operations(controller_openapi()))
    assert runs["sidecar"] >= 10 * len(_operations(sidecar_openapi()))
    assert fuzz_cases["controller", 200] > 0 and fuzz_cases["sidecar", 200] > 0
    health = world.fleet.http.get("/health").json()
    assert health["instances_up"] == len(world.fleet.sidecars)
    assert world.fleet.wait_lookup(HAND_TOKENS, {HAND_SRC: 100}) == {HAND_SRC: 100}
