"""Make a small local causal LM for demos, tests and benchmarks (no model hub needed).

The model is a random-init Llama saved with ``transformers`` — or, with ``--arch mla``, a
DeepSeek-V2 (multi-head latent attention: a 576-element latent KV vector per token and layer,
kv_lora_rank 512 + rotary 64, the one size vLLM's CPU MLA backend runs; dense MLPs); the
tokenizer is a byte-level BPE trained with ``tokenizers`` on the Python standard library's own
sources, which every machine with Python has. Output is deterministic for a given seed and
shape.

Usage::

    python examples/make_model.py OUT_DIR [--layers 2] [--kv-heads 2] [--heads 4]
                                          [--head-dim 64] [--vocab 4096] [--seed 0]
                                          [--arch llama|mla]

Writes ``OUT_DIR/config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and a ``.complete`` marker; does nothing if the marker exists
with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def _training_files(limit: int = 400) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    return files[:limit]


def make_model(out_dir: str, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 64, vocab: int = 4096, seed: int = 0,
               max_position: int = 16384, hidden: int | None = None,
               arch: str = "llama") -> Path:
    """Create the model directory; return its path. Idempotent for the same arguments.

    ``hidden`` defaults to ``heads * head_dim``; a smaller one keeps the KV per token (set by
    layers, kv_heads and head_dim) while making the rest of the model cheap. ``arch``:
    ``"llama"``, or ``"mla"`` (DeepSeek-V2; ``kv_heads`` and ``head_dim`` then shape only the
    queries and values: its KV is the latent vector).
    """
    out = Path(out_dir)
    hidden = hidden or heads * head_dim
    spec = dict(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                vocab=vocab, seed=seed, max_position=max_position, hidden=hidden)
    if arch != "llama":
        spec["arch"] = arch  # absent for llama: markers written before the option still match
    marker = out / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Tokenizer: byte-level BPE with BOS prepended, as Llama tokenizers do.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(_training_files(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    # transformers 5 writes a class name older loaders do not know.
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2))

    torch.manual_seed(seed)
    if arch == "mla":
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        config = DeepseekV2Config(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=None, qk_nope_head_dim=head_dim,
            v_head_dim=head_dim, first_k_dense_replace=layers,  # every MLP dense, no experts
            moe_intermediate_size=hidden, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, rope_scaling=None, max_position_embeddings=max_position,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="bfloat16",
            tie_word_embeddings=False)
        model = DeepseekV2ForCausalLM(config).to(torch.bfloat16)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=max_position, bos_token_id=0,
            eos_token_id=1, pad_token_id=2, torch_dtype="bfloat16", tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown arch {arch!r}: llama or mla")
    model.save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(spec))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=None, help="default: heads * head_dim")
    p.add_argument("--arch", choices=("llama", "mla"), default="llama",
                   help="mla: DeepSeek-V2's multi-head latent attention")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = make_model(a.out_dir, a.layers, a.heads, a.kv_heads, a.head_dim, a.vocab, a.seed,
                      hidden=a.hidden, arch=a.arch)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
