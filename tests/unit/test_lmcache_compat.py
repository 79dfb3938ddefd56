from pathlib import Path

import pytest

from vllm_kvmove.config import ConfigError, load_config
from vllm_kvmove.lmcache_compat import translate

SEED_FILES = Path(__file__).resolve().parents[2] / "examples" / "move" / "lmcache"


def test_seed_instance_files_map_onto_kvmove_keys():
    cfg = load_config(None, env={"LMCACHE_CONFIG_FILE": str(SEED_FILES / "instance2.yaml")})
    assert cfg.instance_id == "lmcache_instance_2"
    assert cfg.sidecar_port == 8501 and cfg.p2p_init_port == 8202 and cfg.p2p_host == "localhost"
    assert (cfg.controller_pull_url, cfg.controller_reply_url) == ("localhost:8300", "localhost:8400")
    assert cfg.chunk_size == 256 and cfg.max_local_cpu_size == 5
    ignored = " ".join(cfg.notes)
    for key in ("local_cpu", "enable_p2p", "p2p_lookup_ports"):
        assert repr(key) in ignored
    # transfer_channel: "nixl" is honoured: bytes go over NIXL, even between engines on one host.
    assert cfg.same_host_copy is False and "transfer_channel" not in ignored


@pytest.mark.parametrize("lmcache,extra,expect", [
    ({"transfer_channel": "nixl"}, None, False),
    ({"transfer_channel": "nixl", "same_host_copy": True}, None, True),  # said in the file
    ({"transfer_channel": "nixl"}, {"same_host_copy": True}, True),  # kv_connector_extra_config
    ({}, None, True),  # no channel named: the default
])
def test_transfer_channel_nixl_turns_the_same_host_shortcut_off(tmp_path, lmcache, extra, expect):
    import yaml

    f = tmp_path / "lm.yaml"
    f.write_text(yaml.safe_dump({"lmcache_instance_id": "a", **lmcache}))
    assert load_config(extra, env={"LMCACHE_CONFIG_FILE": str(f)}).same_host_copy is expect


def test_another_transfer_channel_is_reported_not_obeyed():
    out, notes = translate({"transfer_channel": "py_socket"})
    assert out == {} and any("'py_socket' is not a channel here" in n for n in notes)


def test_kvmove_file_wins_over_lmcache_file(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("instance_id: mine\n")
    cfg = load_config(None, env={"KVMOVE_CONFIG_FILE": str(own),
                                 "LMCACHE_CONFIG_FILE": str(SEED_FILES / "instance1.yaml")})
    assert cfg.instance_id == "mine" and cfg.notes == ()


def test_extra_config_overrides_lmcache_file():
    cfg = load_config({"max_local_cpu_size": 0.25},
                      env={"LMCACHE_CONFIG_FILE": str(SEED_FILES / "instance1.yaml")})
    assert cfg.max_local_cpu_size == 0.25 and cfg.instance_id == "lmcache_instance_1"


def test_lists_of_ports_take_the_first_and_controller_can_be_disabled():
    out, notes = translate({"lmcache_worker_ports": [8600, 8601], "p2p_init_ports": [8300],
                            "enable_controller": False, "local_disk": "/x"})
    assert out == {"sidecar_port": 8600, "p2p_init_port": 8300, "controller_pull_url": "",
                   "controller_reply_url": ""}
    assert any("local_disk" in n for n in notes)


def test_typos_in_lmcache_files_still_fail(tmp_path):
    f = tmp_path / "lm.yaml"
    f.write_text("lmcache_instance_id: a\nchunk_sizee: 256\n")
    with pytest.raises(ConfigError, match="'chunk_sizee'"):
        load_config(None, env={"LMCACHE_CONFIG_FILE": str(f)})
