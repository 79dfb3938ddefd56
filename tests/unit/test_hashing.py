import subprocess
import sys

import pytest

from vllm_kvmove.hashing import chunk_spans

FP = "fingerprint-a"


def test_spans_cover_tokens_with_partial_tail():
    toks = list(range(1, 701))
    spans = chunk_spans(toks, 256, FP)
    assert [(s.start, s.end) for s in spans] == [(0, 256), (256, 512), (512, 700)]
    assert spans[-1].num_tokens == 188
    assert len({s.key for s in spans}) == 3 and all(len(s.key) == 16 for s in spans)


def test_short_prompt_has_one_partial_chunk():
    spans = chunk_spans(list(range(12)), 256, FP)
    assert len(spans) == 1 and spans[0].num_tokens == 12


def test_keys_are_chained_prefix_hashes():
    a = chunk_spans(list(range(600)), 256, FP)
    b = chunk_spans(list(range(512)) + [7] * 88, 256, FP)
    assert [s.key for s in a[:2]] == [s.key for s in b[:2]]
    assert a[2].key != b[2].key
    # same tokens in chunk 1 but a different chunk 0: different key for chunk 1
    c = chunk_spans([9] + list(range(1, 600)), 256, FP)
    assert c[1].key != a[1].key


def test_partial_tail_key_differs_from_extended_chunk():
    short = chunk_spans(list(range(300)), 256, FP)
    long = chunk_spans(list(range(400)), 256, FP)
    assert short[0].key == long[0].key and short[1].key != long[1].key


def test_fingerprint_salts_every_key():
    a = chunk_spans(list(range(300)), 256, "fp-a")
    b = chunk_spans(list(range(300)), 256, "fp-b")
    assert not {s.key for s in a} & {s.key for s in b}


def test_keys_do_not_depend_on_pythonhashseed():
    code = ("from vllm_kvmove.hashing import chunk_spans;"
            "print(chunk_spans(list(range(300)), 256, 'x')[1].key.hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    assert outs.pop().strip() == chunk_spans(list(range(300)), 256, "x")[1].key.hex()


@pytest.mark.parametrize("bad", [-1, 1 << 31])
def test_out_of_range_token_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="out of range"):
        chunk_spans([1, 2, bad], 256, FP)
