"""The seed's Move/Migrate example, end to end, on this machine — with the commands and the
HTTP API a user has, and nothing else.

1. makes a small local model (random-init Llama + a tokenizer trained locally; no hub);
2. starts two vLLM engines with ``kvmove-serve`` (instance1.yaml on :8000, instance2.yaml on
   :8001) and ``kvmove-controller`` (:9000, ZMQ :8300/:8400) — the seed's ports and the
   README's environment;
3. walks the seed's steps 3-7, printing every request and answer:
   a completion on engine 1, /tokenize, POST /move, GET /events/{id} (the status check the seed
   calls "coming soon"), and the same prompt on engine 2, served from the moved KV — checked by
   engine 2's own /metrics and by comparing greedy outputs;
4. stops every process it started, by PID (SIGINT, then SIGKILL of its process group).

Usage: python examples/move/run_demo.py [--prompt TEXT] [--workdir DIR] [--keep-running]
Exit status 0 when the move is proven, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent  # the console scripts of this environment

SEED_PROMPT = "Explain the significance of KV cache in language models."
CONTROLLER = "http://localhost:9000"
ENGINE1, ENGINE2 = "http://localhost:8000", "http://localhost:8001"
HITS = "vllm:external_prefix_cache_hits_total"
# As in the README's "Running it by hand": a CPU engine, loopback only, no hub.
ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
       "HF_HUB_OFFLINE": "1"}
KV_TRANSFER_CONFIG = '{"kv_connector":"KVMoveConnector","kv_role":"kv_both"}'


def launch(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> subprocess.Popen:
    """Start a process in its own session (so it can be stopped with its children), output
    in ``workdir/<name>.log``."""
    with open(workdir / f"{name}.log", "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (vLLM shuts its engine down and the connector says goodbye), then SIGKILL of the
    process group after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode}); see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def show(method: str, url: str, body: object | None, answer: httpx.Response) -> dict:
    print(f"\n$ curl -X {method} {url}" + (f" -d '{json.dumps(body)}'" if body is not None else ""))
    try:
        data = answer.json()
    except ValueError:
        data = {"raw": answer.text[:300]}
    print(f"  -> {answer.status_code} {json.dumps(data)[:600]}")
    return data


def post(url: str, body: object) -> dict:
    return show("POST", url, body, httpx.post(url, json=body, timeout=120))


def get(url: str) -> dict:
    return show("GET", url, None, httpx.get(url, timeout=30))


def metric(engine: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(engine + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=SEED_PROMPT)
    ap.add_argument("--workdir", default=str(REPO / ".work" / "demo"))
    ap.add_argument("--keep-running", action="store_true", help="leave the cluster up at the end")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    model = REPO / ".work" / "models" / "tiny-llama"
    print(f"[demo] making the local model in {model}")
    subprocess.run([sys.executable, str(REPO / "examples" / "make_model.py"), str(model)], check=True,
                   stdout=subprocess.DEVNULL)
    procs: list[subprocess.Popen] = []
    ok = False
    try:
        t0 = time.monotonic()
        print("[demo] step 1-2: starting engine 1 (:8000), engine 2 (:8001) and the controller (:9000)")
        for i, port in ((1, 8000), (2, 8001)):
            procs.append(launch(f"engine{i}", [
                str(BIN / "kvmove-serve"), str(model), "--port", str(port), "--host", "127.0.0.1",
                "--enforce-eager", "--kv-transfer-config", KV_TRANSFER_CONFIG],
                {**ENV, "VLLM_CPU_OMP_THREADS_BIND": str(i - 1),
                 "KVMOVE_CONFIG_FILE": str(HERE / f"instance{i}.yaml")}, workdir))
        procs.append(launch("controller", [
            str(BIN / "kvmove-controller"), "--host", "localhost", "--port", "9000",
            "--monitor-ports", '{"pull": 8300, "reply": 8400}'], {}, workdir))
        for url, proc in zip((ENGINE1, ENGINE2, CONTROLLER), procs):
            wait_healthy(url, proc)
        print(f"[demo] all up in {time.monotonic() - t0:.1f} s (logs in {workdir})")
        for _ in range(60):
            if sum(i["up"] for i in httpx.get(CONTROLLER + "/instances").json()["instances"]) == 2:
                break
            time.sleep(0.5)
        get(CONTROLLER + "/instances")

        print("\n[demo] step 3: a completion on engine 1")
        model_name = str(model)
        src = post(ENGINE1 + "/v1/completions", {"model": model_name, "prompt": args.prompt,
                                                 "max_tokens": 10, "temperature": 0})
        print("\n[demo] step 4: tokenize the prompt with engine 1")
        tokens = post(ENGINE1 + "/tokenize", {"model": model_name, "prompt": args.prompt})["tokens"]
        time.sleep(0.2)  # let engine 1's store event reach the controller
        post(CONTROLLER + "/lookup", {"tokens": tokens})

        print("\n[demo] step 5: move the KV from engine 1's CPU to engine 2's CPU")
        moved = post(CONTROLLER + "/move", {
            "old_position": ["lmcache_instance_1", "LocalCPUBackend"],
            "new_position": ["lmcache_instance_2", "LocalCPUBackend"], "tokens": tokens})
        print("\n[demo] step 6: check the move's status by its event id (long-polled until it ends)")
        status = get(f"{CONTROLLER}/events/{moved['event_id']}?wait=30")
        post(CONTROLLER + "/lookup", {"tokens": tokens})

        print("\n[demo] step 7: the same prompt on engine 2, served from the moved KV")
        hits0, host0 = metric(ENGINE2, HITS), metric(ENGINE2, "vllm:prompt_tokens_cached_by_source_total", source="host")
        dst = post(ENGINE2 + "/v1/completions", {"model": model_name, "prompt": args.prompt,
                                                 "max_tokens": 10, "temperature": 0})
        hits = metric(ENGINE2, HITS) - hits0
        host = metric(ENGINE2, "vllm:prompt_tokens_cached_by_source_total", source="host") - host0
        n = len(tokens)
        same = src["choices"][0]["text"] == dst["choices"][0]["text"]
        print(f"\n[demo] engine 2 {HITS} rose by {hits:.0f} (prompt: {n} tokens; "
              f"vLLM recomputes the last one), {host:.0f} of them from the host tier")
        transfers = httpx.get("http://127.0.0.1:8501/store").json()["transfers"]
        path = ("copied from engine 1's shared pool (same host)" if transfers["same_host_fetches"]
                else "read over NIXL")
        print(f"[demo] move status: {status['status']}, {status['num_chunks']} chunk(s), "
              f"{status['bytes']} bytes in {status['elapsed_s'] * 1000:.1f} ms, {path}")
        print(f"[demo] greedy outputs identical: {same}")
        ok = status["status"] == "done" and moved["num_tokens"] == n and hits >= n - 1 and same
        print("[demo] RESULT:", "the move is proven" if ok else "FAILED")
        if args.keep_running:
            print("[demo] leaving the cluster running; PIDs:", [p.pid for p in procs])
            procs.clear()
    finally:
        print("[demo] stopping every process started (by PID)")
        for proc in reversed(procs):
            stop(proc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
