import pytest

from vllm_kvmove.config import ConfigError, KVMoveConfig, build_config, load_config


def test_defaults_match_seed_ports():
    cfg = build_config()
    assert cfg == KVMoveConfig()
    assert (cfg.controller_pull_url, cfg.controller_reply_url) == ("localhost:8300", "localhost:8400")
    assert cfg.capacity_bytes == 1 << 30


def test_file_then_extra_config_overrides(tmp_path):
    f = tmp_path / "instance1.yaml"
    f.write_text("instance_id: lmcache_instance_1\nsidecar_port: 8500\nchunk_size: 256\n"
                 "max_local_cpu_size: 0.5\n")
    cfg = load_config({"sidecar_port": 9500}, env={"KVMOVE_CONFIG_FILE": str(f)})
    assert cfg.instance_id == "lmcache_instance_1"
    assert cfg.sidecar_port == 9500  # extra config wins over the file
    assert cfg.chunk_size == 256
    assert cfg.capacity_bytes == 512 << 20


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("instance_id: a\nchunk_sise: 256\n")
    with pytest.raises(ConfigError, match="'chunk_sise'"):
        load_config(None, env={"KVMOVE_CONFIG_FILE": str(f)})
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config({"bogus": 1}, env={})


@pytest.mark.parametrize("key,value", [("chunk_size", "many"), ("chunk_size", 0), ("sidecar_port", 70000),
                                       ("max_local_cpu_size", -1), ("chunk_size", 2.5),
                                       ("instance_id", ""), ("p2p_init_port", True),
                                       ("save_mode", "later"), ("save_mode", True)])
def test_bad_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        build_config({key: value})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, env={"KVMOVE_CONFIG_FILE": str(tmp_path / "nope.yaml")})


def test_non_mapping_file(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(None, env={"KVMOVE_CONFIG_FILE": str(f)})
