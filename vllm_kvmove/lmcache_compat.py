"""Read LMCache configuration files (``LMCACHE_CONFIG_FILE``) as vllm-kvmove configuration.

Someone coming from LMCache's Move/Migrate example arrives with instance YAML files such as::

    chunk_size: 256
    local_cpu: True
    max_local_cpu_size: 5
    enable_controller: True
    lmcache_instance_id: "lmcache_instance_1"
    controller_pull_url: "localhost:8300"
    controller_reply_url: "localhost:8400"
    lmcache_worker_ports: 8500
    enable_p2p: True
    p2p_host: "localhost"
    p2p_init_ports: 8200
    p2p_lookup_ports: 8201
    transfer_channel: "nixl"

:func:`translate` maps the keys that mean something here onto vllm-kvmove's own keys and
lists the LMCache keys that have no meaning here (they are accepted, and reported once at
start-up). A key that is neither vllm-kvmove's nor LMCache's is still an error.
"""

from __future__ import annotations

from typing import Any, Mapping

# LMCache key -> vllm-kvmove key. List-valued port keys (one port per worker in LMCache) take
# the first port: an engine here has one worker and one sidecar.
RENAMED = {
    "lmcache_instance_id": "instance_id",
    "lmcache_worker_port": "sidecar_port",
    "lmcache_worker_ports": "sidecar_port",
    "p2p_init_ports": "p2p_init_port",
    "p2p_init_port": "p2p_init_port",
    "p2p_host": "p2p_host",
    "controller_pull_url": "controller_pull_url",
    "controller_reply_url": "controller_reply_url",
    "chunk_size": "chunk_size",
    "max_local_cpu_size": "max_local_cpu_size",
}

# LMCache keys accepted without effect here, with why.
IGNORED = {
    "local_cpu": "KV is always kept in host memory (LocalCPUBackend)",
    "enable_p2p": "peer-to-peer transfers are always on",
    "p2p_lookup_ports": "lookups go through the controller's index, not a per-peer port",
    "controller_url": "sidecars reach the controller through controller_pull_url / controller_reply_url",
    "lmcache_worker_ids": "one worker per engine",
    "lmcache_worker_heartbeat_time": "use heartbeat_interval_s",
    "lmcache_worker_heartbeat_delay_time": "sidecars heartbeat from start-up",
    "enable_async_loading": "loads are synchronous copies from host memory",
    "save_unfull_chunk": "partial last chunks are always saved",
    "use_layerwise": "whole-step copies are used on CPU",
    "save_decode_cache": "only prompt KV is stored",
    "local_cpu_use_hugepages": "not used",
    "reserve_local_cpu_size": "not used",
    "numa_mode": "not used",
    "pre_caching_hash_algorithm": "chunk keys are blake2b, salted with the KV layout",
    "nixl_backends": "the UCX backend is used",
    "nixl_buffer_size": "the store pool is the NIXL buffer",
    "nixl_buffer_device": "the store pool is in host memory",
    "cache_policy": "eviction is LRU",
    "pin_timeout_sec": "operator pins last until /unpin",
    "pin_check_interval_sec": "operator pins last until /unpin",
    "lookup_timeout_ms": "scheduler lookups time out after 1 s",
    "blocking_timeout_secs": "see command_timeout_s",
    "enable_kv_events": "store events always go to the controller",
    "extra_config": "not used",
}
# Every other LMCache option (disk, remote, blending, P/D, GDS, ...) names a feature this
# project does not have; such keys are accepted and reported as ignored too.
OTHER_LMCACHE_KEYS = frozenset("""
local_disk local_disk_path_sharding max_local_disk_size remote_url remote_serde enable_blending
blend_recompute_ratios blend_thresholds blend_check_layers blend_min_tokens blend_special_str
retrieve_locations store_location mp_host mp_port enable_pd pd_role pd_buffer_size
pd_buffer_device pd_peer_host pd_peer_init_port pd_peer_alloc_port pd_peer_query_port
pd_proxy_host pd_proxy_port pd_allocation_timeout_sec pd_shutdown_timeout_sec
pd_condition_poll_interval_sec pd_max_prefill_len pd_backend_mode pd_skip_proxy_notification
pd_bidirectional gds_path gds_path_sharding gds_buffer_size maru_path maru_pool_size use_gds
gds_backend audit_actual_remote_url internal_api_server_host external_lookup_client
py_enable_gc internal_api_server_enabled internal_api_server_port_start priority_limit
internal_api_server_include_index_list internal_api_server_socket_path_prefix
runtime_plugin_locations storage_plugins remote_storage_plugins min_retrieve_tokens
hit_miss_ratio lookup_server_worker_ids enable_scheduler_bypass_lookup script_allowed_imports
run_script_api_enabled enable_lazy_memory_allocator lazy_memory_initial_ratio
lazy_memory_expand_trigger_ratio lazy_memory_step_ratio lazy_memory_safe_size
enable_chunk_statistics chunk_statistics_auto_start_statistics
chunk_statistics_auto_exit_timeout_hours chunk_statistics_auto_exit_target_unique_chunks
chunk_statistics_strategy remote_config_url app_id enable_hidden_state_cache
max_hidden_state_cpu_size hidden_state_layers hidden_states_retrieve_mode
""".split())


def translate(lmcache: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map an LMCache config onto vllm-kvmove keys.

    Returns:
        ``(kvmove_keys, notes)``: the vllm-kvmove key/values, and one human-readable note per
        LMCache key that has no effect here. Keys that are not LMCache's are passed through
        unchanged (so vllm-kvmove's own keys may be mixed in, and typos still fail validation).
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in lmcache.items():
        if key in RENAMED:
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                out[RENAMED[key]] = value
        elif key == "transfer_channel":
            if str(value).lower() == "nixl":
                # The file asks for NIXL: no same-host shortcut, unless it says so itself.
                out.setdefault("same_host_copy", lmcache.get("same_host_copy", False))
            else:
                notes.append(f"LMCache key 'transfer_channel' ignored: {value!r} is not a channel "
                             f"here; transfers use NIXL (UCX), or shared memory on one host")
        elif key == "enable_controller":
            if not value:
                out["controller_pull_url"] = out["controller_reply_url"] = ""
                notes.append("enable_controller is false: running without a controller")
        elif key in IGNORED:
            notes.append(f"LMCache key {key!r} ignored: {IGNORED[key]}")
        elif key in OTHER_LMCACHE_KEYS:
            notes.append(f"LMCache key {key!r} ignored: vllm-kvmove has no such feature")
        else:
            out[key] = value
    if lmcache.get("enable_controller") is False:
        out["controller_pull_url"] = out["controller_reply_url"] = ""
    return out, notes
