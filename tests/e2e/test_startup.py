"""Engine start-up with a bad vllm-kvmove config fails fast and says why."""

from __future__ import annotations

import time

from tests.harness.engines import model_dir
from tests.harness.processes import LocalCluster, free_port


def test_unknown_config_key_stops_startup_naming_the_key(tmp_path):
    local = LocalCluster(model_dir(), tmp_path)
    try:
        proc = local.start_engine("badkey", free_port(), extra_config={
            "instance_id": "badkey", "chunk_sise": 256, "sidecar_port": free_port(),
            "p2p_init_port": free_port(), "controller_reply_url": "", "controller_pull_url": ""})
        t0 = time.monotonic()
        while proc.alive() and time.monotonic() - t0 < 240:
            time.sleep(0.5)
        assert not proc.alive(), "engine started despite an unknown config key"
        log = proc.log_path.read_text(errors="replace")
        assert "unknown vllm-kvmove config key 'chunk_sise'" in log
    finally:
        local.stop_all()
