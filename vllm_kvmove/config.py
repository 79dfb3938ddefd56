"""Configuration of one vllm-kvmove engine instance.

Where it comes from, in order of precedence (later wins):
  1. defaults below;
  2. a YAML file named by ``KVMOVE_CONFIG_FILE`` — or, if that is unset, an LMCache config
     file named by ``LMCACHE_CONFIG_FILE``, translated by :mod:`vllm_kvmove.lmcache_compat`;
  3. ``kv_connector_extra_config`` inside vLLM's ``--kv-transfer-config``.

Every process of an engine (API server, EngineCore, Worker) loads the same config the same
way, so they agree on it without talking. Unknown keys are an error at start-up that names
the key: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_kvmove.lmcache_compat import translate
from vllm_kvmove.zmqauth import FleetSecurity, SecurityError

CONFIG_FILE_ENV = "KVMOVE_CONFIG_FILE"
API_TOKEN_ENV = "KVMOVE_API_TOKEN"
LMCACHE_CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


@dataclass(frozen=True)
class KVMoveConfig:
    """Settings of one engine's connector, store and sidecar.

    Attributes:
        instance_id: Name of this engine in the controller (unique per fleet).
        controller_pull_url: ``host:port`` of the controller's PULL socket (store events).
            Empty string: run without a controller.
        controller_reply_url: ``host:port`` of the controller's ROUTER socket
            (registration, heartbeats, commands).
        sidecar_host: Interface the sidecar's HTTP app binds to.
        sidecar_port: Port of the sidecar's HTTP app.
        p2p_host: Interface the NIXL metadata handshake socket binds to, and the address peers
            use to reach it.
        p2p_init_port: Port of the NIXL metadata handshake socket.
        engine_url: Base URL of this engine's OpenAI server (the controller tokenizes there).
        chunk_size: Tokens per store chunk; a multiple of the engine's KV block size.
        max_local_cpu_size: Store capacity in GiB of host memory (``LocalCPUBackend``).
        hash_seed: Extra salt for chunk keys; engines with different seeds never share KV.
        heartbeat_interval_s: Seconds between sidecar heartbeats to the controller.
        command_timeout_s: Upper bound on any single wait on a peer (NIXL handshake, read).
        api_token: The fleet's shared secret (at least 16 characters). When set, every ZMQ
            socket (to the controller, the NIXL metadata handshake) runs CURVE with keys
            derived from it, so only fleet members connect, and the sidecar's HTTP endpoints
            but ``GET /health`` need it as a bearer token. Without it, the sidecar listens on
            loopback only. Default: the environment variable ``KVMOVE_API_TOKEN``. Never
            logged, never sent.
        metrics_open: serve the sidecar's ``GET /metrics`` without the token (for scrapers).
        tls_cert, tls_key: PEM files; when both are given the sidecar's HTTP app is served
            over HTTPS.
        verify_checksums: check every fetched chunk's checksum before publishing it. Off
            trades integrity for speed: the check reads every byte once more, which costs
            about a third of a same-host move's throughput here (P1: 7.6 vs 11.1 GB/s).
        same_host_copy: keep the store pool in shared memory and, when the source engine
            runs on this host, copy its chunks by mapping its pool (memcpy speed) instead of
            reading them over NIXL's cma (a page-at-a-time kernel copy). Off: NIXL only.
        prefault_pool: commit the store's whole pool (``max_local_cpu_size``) in the
            background right after start-up, instead of page by page as chunks are first
            written: an engine's first moves and saves then run as fast as later ones (a
            fresh destination paid a page fault per 4 KiB, several times the copy itself).
            The memory is the engine's from start-up on, as a GPU engine's pinned pool is.
        copy_threads: threads this engine uses for same-host copies (shared by concurrent ones).
        load_threads: helper threads that copy a step's loads from the store into the paged
            cache layer by layer while the forward pass runs, on the CPUs beside the forward's
            (the forward waits at each layer's attention only for that layer's blocks, and
            copies alongside while it waits). On a core another engine keeps busy a helper
            waited runnable for seconds: a forward kept waiting 5 ms on one moves the helpers
            onto its own CPUs, and they sit out later steps until the CPUs beside were at
            least 50 % idle over 0.1 s. None when the worker may use every CPU. Meanwhile, and
            with 0, the forward thread copies each layer just before its attention (always so
            for CUDA caches, whose copies are ordered on the forward's stream).
        save_mode: where the copies of a step's completed prompt chunks into the store run
            (:mod:`vllm_kvmove.saver`). ``"inline"``: on the forward thread, after the forward
            (a host cache's memcpy on the core the forward has just finished with: serving
            throughput with every prompt saved measured no loss, P5). ``"background"``: off
            the forward's path — for a CUDA cache on a side stream that waits for the
            forward, device-to-host into the page-locked pool; for a host cache on a saver
            thread beside the forward's CPU — each chunk visible once its copy completed; a
            step that reuses a block a save still reads waits for that save (on the device,
            for CUDA). ``"auto"`` (default): background for CUDA caches, inline for host
            caches.
        p2p_data_ports: ``"LOW-HIGH"``: the TCP ports the KV bytes between hosts may use on
            this host (UCX's listener on ``p2p_host``), for a firewall; "" (default): any port
            the system gives.
        kv_events_port: publish the store's KV events in vLLM's format (``BlockStored`` /
            ``BlockRemoved``, ``medium="CPU"``) on a ZMQ PUB socket on ``sidecar_host`` at this
            port (rank r: ``+ r``); 0 (default): not published there. The engine's own event
            stream (``--kv-events-config``) carries them too, when enabled.
        kv_events_topic: the ZMQ topic of those events; "" (default):
            ``kv@<instance_id>@<model>`` (rank r > 0: ``kv@<instance_id>.rank<r>@<model>``).
        drain_on_shutdown: when the engine shuts down (SIGTERM), ask the controller to drain
            it — move everything its store holds to the other engines — and wait for the
            drain before exiting, up to ``drain_timeout_s``. vLLM kills its engine process
            ``--shutdown-timeout`` seconds after SIGTERM (at once with the default 0): give
            the engine ``--shutdown-timeout`` above ``drain_timeout_s``.
        drain_timeout_s: the longest wait for that drain; what has not moved by then is
            reported in the engine's log (and stays, lost with the engine).
    """

    instance_id: str = "kvmove_instance"
    controller_pull_url: str = "localhost:8300"
    controller_reply_url: str = "localhost:8400"
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = 8500
    p2p_host: str = "127.0.0.1"
    p2p_init_port: int = 8200
    engine_url: str = "http://localhost:8000"
    chunk_size: int = 256
    max_local_cpu_size: float = 1.0
    hash_seed: str = ""
    heartbeat_interval_s: float = 1.0
    command_timeout_s: float = 30.0
    api_token: str = dataclasses.field(default="", repr=False)
    verify_checksums: bool = True
    same_host_copy: bool = True
    prefault_pool: bool = True
    copy_threads: int = 2
    load_threads: int = 1
    save_mode: str = "auto"
    p2p_data_ports: str = ""
    kv_events_port: int = 0
    kv_events_topic: str = ""
    metrics_open: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    drain_on_shutdown: bool = False
    drain_timeout_s: float = 60.0
    # LMCache keys that were accepted without effect (reported once at start-up).
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def capacity_bytes(self) -> int:
        return round(self.max_local_cpu_size * (1 << 30))

    def for_rank(self, rank: int) -> "KVMoveConfig":
        """The config of tensor-parallel ``rank``'s store and sidecar: the same, with the
        sidecar's HTTP port, the NIXL metadata port and the KV events port each ``+ rank``
        (rank 0 keeps the configured ones; leave ``world_size - 1`` ports free above each)."""
        if rank == 0:
            return self
        return dataclasses.replace(self, sidecar_port=self.sidecar_port + rank,
                                   p2p_init_port=self.p2p_init_port + rank,
                                   kv_events_port=self.kv_events_port + rank
                                   if self.kv_events_port else 0)


_FIELDS = {f.name: f for f in dataclasses.fields(KVMoveConfig) if f.name != "notes"}


def _coerce(key: str, value: Any) -> Any:
    kind = _FIELDS[key].type
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "str":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: expected {kind}, got {value!r}") from None
    return value


def _read_yaml(path: str, env_name: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {env_name}={path!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{env_name}={path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def build_config(*layers: Mapping[str, Any] | None, notes: tuple[str, ...] = ()) -> KVMoveConfig:
    """Merge key/value layers (later wins) into a validated :class:`KVMoveConfig`.

    Raises:
        ConfigError: on an unknown key, a value of the wrong type or out of range.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in _FIELDS:
                raise ConfigError(
                    f"unknown vllm-kvmove config key {key!r}; known keys: {', '.join(sorted(_FIELDS))}")
            merged[key] = _coerce(key, value)
    cfg = KVMoveConfig(**merged, notes=notes)
    if cfg.chunk_size <= 0:
        raise ConfigError(f"config key 'chunk_size' must be positive, got {cfg.chunk_size}")
    if cfg.max_local_cpu_size <= 0:
        raise ConfigError(f"config key 'max_local_cpu_size' must be positive, got {cfg.max_local_cpu_size}")
    for key in ("sidecar_port", "p2p_init_port"):
        port = getattr(cfg, key)
        if not 0 < port < 65536:
            raise ConfigError(f"config key {key!r} must be a TCP port, got {port}")
    if not 0 <= cfg.kv_events_port < 65536:
        raise ConfigError(f"config key 'kv_events_port' must be a TCP port or 0, got "
                          f"{cfg.kv_events_port}")
    if not cfg.instance_id:
        raise ConfigError("config key 'instance_id' must not be empty")
    if not 1 <= cfg.copy_threads <= 64:
        raise ConfigError(f"config key 'copy_threads' must be 1..64, got {cfg.copy_threads}")
    if not 0 <= cfg.load_threads <= 64:
        raise ConfigError(f"config key 'load_threads' must be 0..64, got {cfg.load_threads}")
    if cfg.save_mode not in ("auto", "inline", "background"):
        raise ConfigError(f"config key 'save_mode' must be auto, inline or background, got "
                          f"{cfg.save_mode!r}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("config keys 'tls_cert' and 'tls_key' go together")
    low, _, high = cfg.p2p_data_ports.partition("-")
    if cfg.p2p_data_ports and not (low.isdigit() and high.isdigit()
                                   and 0 < int(low) <= int(high) < 65536):
        raise ConfigError(f"config key 'p2p_data_ports' must be LOW-HIGH TCP ports, got "
                          f"{cfg.p2p_data_ports!r}")
    try:
        security = FleetSecurity(cfg.api_token)
        security.check_bind(cfg.sidecar_host, "the sidecar's HTTP app (sidecar_host)")
        security.check_bind(cfg.p2p_host, "the NIXL metadata server (p2p_host)")
    except SecurityError as e:
        raise ConfigError(f"config key 'api_token': {e}") from None
    return cfg


def load_config(extra_config: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> KVMoveConfig:
    """Load the config: the file named by ``KVMOVE_CONFIG_FILE`` (or an LMCache file named by
    ``LMCACHE_CONFIG_FILE``) overlaid by ``extra_config``.

    Args:
        extra_config: ``kv_connector_extra_config`` from vLLM (may be None).
        env: environment to read ``KVMOVE_CONFIG_FILE`` from (default ``os.environ``).
    Returns:
        The validated config.
    Raises:
        ConfigError: as :func:`build_config`, or when the file cannot be read.
    """
    env = os.environ if env is None else env
    notes: list[str] = []
    if env.get(CONFIG_FILE_ENV):
        file_layer = _read_yaml(env[CONFIG_FILE_ENV], CONFIG_FILE_ENV)
    elif env.get(LMCACHE_CONFIG_FILE_ENV):
        file_layer, notes = translate(_read_yaml(env[LMCACHE_CONFIG_FILE_ENV], LMCACHE_CONFIG_FILE_ENV))
    else:
        file_layer = {}
    env_layer = {"api_token": env[API_TOKEN_ENV]} if env.get(API_TOKEN_ENV) else {}
    return build_config(env_layer, file_layer, extra_config, notes=tuple(notes))
