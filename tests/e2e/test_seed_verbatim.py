"""The seed's curl commands, verbatim, against an LMCache-configured cluster on the seed's ports.

The commands below are copied character for character from LMCache's Move/Migrate example
(steps 3, 4 and 5). Step 5 is run twice: verbatim — its token ids come from Llama 3's
tokenizer, which this local model does not have, so nothing is held for them and the answer
must be a clear 404, not a 500 — and with the ids step 4 printed, as a user following the
steps on this model would paste them. Then the move's status (the seed's "coming soon") and
the proof on engine 2.
"""

from __future__ import annotations

import json
import re
import subprocess

from tests.harness.engines import S1, S2

STEP3 = """curl -X POST http://localhost:8000/v1/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "prompt": "Explain the significance of KV cache in language models.",
    "max_tokens": 10
  }'"""

STEP4 = """curl -X POST http://localhost:8000/tokenize \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "prompt": "Explain the significance of KV cache in language models."
  }'"""

STEP5 = """curl -X POST http://localhost:9000/move \\
  -H "Content-Type: application/json" \\
  -d '{
    "old_position": ["lmcache_instance_1", "LocalCPUBackend"],
    "new_position": ["lmcache_instance_2", "LocalCPUBackend"],
    "tokens": [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
  }'"""

SEED_TOKENS = "[128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]"
PROMPT = "Explain the significance of KV cache in language models."


def curl(command: str) -> dict:
    out = subprocess.run(["bash", "-c", command + " -s -w '\\n%{http_code}'"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    body, status = out.rsplit("\n", 1)
    return {"status": int(status), "json": json.loads(body)}


def test_seed_curl_commands_verbatim(cluster):
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    step3 = curl(STEP3)
    assert step3["status"] == 200 and step3["json"]["choices"][0]["text"] is not None
    step4 = curl(STEP4)
    assert step4["status"] == 200
    tokens = step4["json"]["tokens"]
    assert step4["json"]["count"] == len(tokens) > 1

    verbatim = curl(STEP5)
    assert verbatim["status"] == 404
    assert "holds no KV" in verbatim["json"]["error"]["message"]

    # The reference text for the proof: engine 1's greedy answer (sampled step 3 can differ).
    reference = e1.complete(PROMPT)["choices"][0]["text"]
    cluster.wait_lookup(tokens, {S1: len(tokens)})
    pasted = curl(STEP5.replace(SEED_TOKENS, json.dumps(tokens)))
    assert pasted["status"] == 200
    assert pasted["json"]["num_tokens"] == len(tokens)
    assert re.fullmatch(r"[0-9a-f]{32}", pasted["json"]["event_id"])

    step6 = cluster.wait_job(pasted["json"]["event_id"])
    assert step6["status"] == "done"
    finish = curl(f"""curl -X POST http://localhost:9000/check_finish -H "Content-Type: application/json" -d '{{"event_id": "{step6['event_id']}"}}'""")
    assert finish["status"] == 200 and finish["json"]["status"] == "done"

    e2.serve_and_check(PROMPT, tokens, reference)
