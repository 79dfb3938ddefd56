"""The ``kvmove`` command line against a real controller process and real sidecars (no vLLM)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sidecar.cli import main
from tests.harness.processes import free_port
from tests.harness.stores import chunk_bytes, fill, keys_of

REPO = Path(__file__).resolve().parents[2]


def csv(tokens: list[int]) -> str:
    return ",".join(map(str, tokens))


def test_console_script_is_declared():
    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "kvmove"]
    assert ep.value == "sidecar.cli:main"


def test_instances_table_lists_the_sidecars(fleet, pair, capsys):
    assert fleet.kvmove("instances") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["INSTANCE", "STATE", "CHUNKS"]
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) >= {"a", "b"}
    assert pair[0].store.stats()["capacity_bytes"] == 128 << 10  # 64 tiny slots
    assert " up " in by_id["a"] and "/ 128.0 KiB" in by_id["a"]
    assert "http://127.0.0.1:9" in by_id["a"] and "s ago" in by_id["a"]


def test_instances_as_a_subprocess_with_controller_from_env(fleet, pair):
    env = {**os.environ, "KVMOVE_CONTROLLER": f"http://localhost:{fleet.port}"}
    r = subprocess.run([sys.executable, "-m", "sidecar.cli", "instances"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {line.split()[0] for line in r.stdout.splitlines()[1:]} >= {"a", "b"}


def test_lookup_by_tokens_lists_holders(fleet, pair, capsys):
    a, _ = pair
    tokens = list(range(6000, 6070))
    fill(a, tokens, seed=21)
    fleet.wait_lookup(tokens, {"a": 70})
    assert fleet.kvmove("lookup", "--tokens", csv(tokens)) == 0
    assert capsys.readouterr().out.split() == ["INSTANCE", "MATCHED", "TOKENS", "a", "70"]
    assert fleet.kvmove("lookup", "--tokens", csv(tokens), "--instance", "b") == 0
    assert capsys.readouterr().out.split() == ["INSTANCE", "MATCHED", "TOKENS", "b", "0"]
    assert fleet.kvmove("lookup", "--tokens", "1,2,3") == 0
    assert "no instance holds KV" in capsys.readouterr().out


def test_move_wait_moves_the_data(fleet, pair, capsys):
    a, b = pair
    tokens = list(range(6100, 6200))  # 3 full chunks + a 4-token tail
    written = fill(a, tokens, seed=22)
    fleet.wait_lookup(tokens, {"a": 100})
    assert fleet.kvmove("move", "--from", "a", "--to", "b", "--tokens", csv(tokens), "--wait") == 0
    out, err = capsys.readouterr()
    assert out.startswith("move a -> b: 100 tokens, event ")
    assert "done: 4 chunks" in out
    assert err.count("\n") == 1 and "100%" in err and "done" in err  # progress bar, final line
    for key, data in written.items():
        assert chunk_bytes(b, key) == data
        assert not a.store.contains(key)
    assert fleet.wait_lookup(tokens, {"b": 100}) == {"b": 100}


def test_copy_json_status_and_events(fleet, pair, capsys):
    a, b = pair
    tokens = list(range(6200, 6240))
    written = fill(a, tokens, seed=23)
    fleet.wait_lookup(tokens, {"a": 40})
    # --json before the command here, after it below
    assert fleet.kvmove("--json", "move", "--from", "a", "--to", "b", "--tokens", csv(tokens),
                  "--copy") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["num_tokens"] == 40 and answer["event_id"]
    eid = answer["event_id"]
    assert fleet.wait_job(eid)["status"] == "done"
    for key, data in written.items():
        assert chunk_bytes(a, key) == chunk_bytes(b, key) == data

    assert fleet.kvmove("status", eid) == 0
    fields = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:]
                  if len(line.split()) > 1)
    assert fields["event_id"] == eid and fields["status"] == "done" and fields["kind"] == "copy"
    assert fleet.kvmove("status", eid, "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 40

    # A job that ended cannot be cancelled: one line, the controller's reason, exit 2.
    assert fleet.kvmove("cancel", eid) == 2
    err = capsys.readouterr().err
    assert err == f"kvmove: error: job {eid} already ended: done [409 conflict]\n"

    assert fleet.kvmove("events", "--limit", "1") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.startswith("EVENT") and row.split()[:3] == [eid, "copy", "done"]
    assert fleet.kvmove("events", "--limit", "1", "--json") == 0
    assert [e["event_id"] for e in json.loads(capsys.readouterr().out)["events"]] == [eid]


def test_pin_unpin_clear(fleet, capsys):
    s = fleet.add_sidecar("cli-pins", slots=8)
    tokens = list(range(6300, 6332))  # one full chunk
    other = list(range(6400, 6464))  # two more
    fill(s, tokens, seed=24)
    fill(s, other, seed=25)
    fleet.wait_lookup(tokens, {"cli-pins": 32})
    fleet.wait_lookup(other, {"cli-pins": 64})

    assert fleet.kvmove("pin", "--instance", "cli-pins", "--tokens", csv(tokens)) == 0
    assert capsys.readouterr().out.startswith("pinned 32 tokens (1 chunk) at cli-pins, event ")
    assert s.store.stats()["pinned_chunks"] == 1
    assert fleet.kvmove("unpin", "--instance", "cli-pins", "--tokens", csv(tokens)) == 0
    assert capsys.readouterr().out.startswith("unpinned 32 tokens (1 chunk) at cli-pins")
    assert s.store.stats()["pinned_chunks"] == 0

    assert fleet.kvmove("clear", "--instance", "cli-pins", "--tokens", csv(tokens)) == 0
    assert capsys.readouterr().out.startswith("cleared 32 tokens (1 chunk) at cli-pins")
    assert not s.store.contains(keys_of(s, tokens)[0])
    assert s.store.stats()["num_chunks"] == 2
    assert fleet.kvmove("clear", "--instance", "cli-pins", "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_chunks"] == 2
    assert s.store.stats()["num_chunks"] == 0


def test_controller_error_is_one_line_and_exit_2(fleet, pair, capsys):
    assert fleet.kvmove("move", "--from", "nope", "--to", "b", "--tokens", "1,2") == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("kvmove: error: unknown instance 'nope' (registered: ")
    assert line.endswith("[404 not_found]")
    assert fleet.kvmove("status", "no-such-event") == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmove: error: unknown event_id 'no-such-event'")
    assert err.endswith("[404 not_found]\n") and err.count("\n") == 1


def test_unreachable_controller_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "sidecar.cli", "--controller", url, "instances"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"kvmove: error: cannot reach controller at {url}: ")


def test_failed_move_with_wait_exits_1_with_the_cause(fleet, pair, capsys):
    a, b = pair
    tokens = list(range(6600, 6664))
    fill(a, tokens, seed=27)
    fleet.wait_lookup(tokens, {"a": 64})
    keys = keys_of(a, tokens)
    (info, *_) = a.store.hold(keys)  # computes and caches the checksums...
    a.store.release(keys)
    a.store.pool[info.offset] ^= 0xFF  # ...then a bit flip: the destination must refuse it
    assert fleet.kvmove("move", "--from", "a", "--to", "b", "--tokens", csv(tokens), "--wait") == 1
    out, err = capsys.readouterr()
    assert out.startswith("move a -> b: 64 tokens, event ")
    error = [line for line in err.splitlines() if line.startswith("kvmove: error:")]
    assert len(error) == 1 and "failed" in error[0] and "checksum" in error[0], err
    assert all(a.store.contains(k) for k in keys)  # a failed move keeps the source
    assert not any(b.store.contains(k) for k in keys)


@pytest.mark.parametrize("argv", [
    ["move", "--from", "a", "--to", "b"],  # no prefix
    ["move", "--from", "a", "--to", "b", "--tokens", "1,x"],
    ["lookup", "--tokens", "1", "--prompt", "hi"],
    ["pin", "--tokens", "1"],  # no --instance
    ["frobnicate"],
])
def test_bad_usage_is_argparse_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: kvmove" in capsys.readouterr().err


class _FakeController(http.server.BaseHTTPRequestHandler):
    """Answers ``GET /instances`` with no instances and anything else with a proxy's HTML 502;
    records the Authorization header of each request."""

    seen_auth: list[str | None] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen_auth.append(self.headers.get("Authorization"))
        ok = self.path == "/instances"
        body = b'{"instances": []}' if ok else b"<html><body>\n<h1>502 Bad Gateway</h1></body></html>"
        self.send_response(200 if ok else 502)
        self.send_header("Content-Type", "application/json" if ok else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_controller():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeController)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeController.seen_auth = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_token_and_controller_from_env_and_flags(fake_controller, monkeypatch, capsys):
    monkeypatch.setenv("KVMOVE_CONTROLLER", fake_controller)
    monkeypatch.setenv("KVMOVE_API_TOKEN", "from-env")
    assert main(["instances"]) == 0
    assert main(["instances", "--token", "from-flag"]) == 0
    monkeypatch.delenv("KVMOVE_API_TOKEN")
    assert main(["instances"]) == 0
    assert _FakeController.seen_auth == ["Bearer from-env", "Bearer from-flag", None]
    assert capsys.readouterr().out.count("no instances registered") == 3


def test_non_json_error_answer_is_one_line(fake_controller, capsys):
    assert main(["--controller", fake_controller, "events"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kvmove: error: GET /events answered 502: <html>")
