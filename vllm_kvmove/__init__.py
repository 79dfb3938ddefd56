"""vllm-kvmove: move KV cache between vLLM engines.

Data plane (this package): :mod:`.config`, :mod:`.hashing`, :mod:`.layout`, :mod:`.store`,
:mod:`.lookup`, :mod:`.transfer`, :mod:`.shm`, :mod:`.connector`. Control plane: the ``sidecar`` package.
"""

CONNECTOR_NAME = "KVMoveConnector"


def register() -> None:
    """vLLM ``general_plugins`` entry point: register :class:`KVMoveConnector`.

    vLLM calls this in each of its processes (API server, EngineCore, worker), possibly more
    than once; registering twice raises in vLLM, so this is a no-op when already registered.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "vllm_kvmove.connector", "KVMoveConnector")
