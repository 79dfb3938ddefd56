"""Which parallel engines the connector accepts: tensor parallelism (with or without a
controller), never pipeline or data parallelism — each refusal names the reason. And each
rank's sidecar listens on the configured ports + rank."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvmove.config import load_config
from vllm_kvmove.connector import _refuse_parallelism
from vllm_kvmove.lookup import lookup_path


def engine(tp=1, pp=1, dp=1):
    return SimpleNamespace(parallel_config=SimpleNamespace(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp))


ALONE = {"controller_pull_url": "", "controller_reply_url": ""}


def test_tensor_parallelism_is_accepted():
    _refuse_parallelism(engine(tp=2))
    _refuse_parallelism(engine(tp=8))
    _refuse_parallelism(engine())


@pytest.mark.parametrize("vllm, reason", [
    (engine(pp=2), "pipeline_parallel_size=2"),
    (engine(dp=2), "data_parallel_size=2"),
    (engine(tp=2, pp=2, dp=4), "pipeline_parallel_size=2, data_parallel_size=4"),
])
def test_other_parallel_engines_are_refused_naming_why(vllm, reason):
    with pytest.raises(ValueError, match=reason):
        _refuse_parallelism(vllm)


def test_each_rank_has_its_own_ports_and_lookup_endpoint():
    cfg = load_config({**ALONE, "sidecar_port": 9500, "p2p_init_port": 9200})
    assert cfg.for_rank(0) is cfg
    r1 = cfg.for_rank(1)
    assert (r1.sidecar_port, r1.p2p_init_port) == (9501, 9201)
    assert r1.instance_id == cfg.instance_id and r1.chunk_size == cfg.chunk_size
    assert lookup_path("e", 0) != lookup_path("e", 1)
    assert lookup_path("e", 0) == lookup_path("e")
