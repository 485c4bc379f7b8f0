"""A tiny random Llama written as a GGUF file with the `gguf` package's own writer: the
metadata llama.cpp writes (architecture, sizes, a byte-level BPE tokenizer with merges and
special tokens) and a Q8_0-quantized embedding, so a fast test runs transformers' real GGUF
reader and dequantizer (fedtune.models.gguf) on a file of 60 KB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Byte-level BPE: the 256 byte symbols, three merges and the specials SmolLM2's file has.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 2, 1, 64


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """Write a 2-layer Llama (hidden 32, GQA, tied embeddings: no `output.weight`) with a
    GPT-2-style tokenizer to `path`; `seed` draws its weights."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = [*SPECIALS, *bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES)]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS))
    head_dim = HIDDEN // HEADS
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    def tensor(name: str, shape: tuple[int, ...], quantize: bool = False) -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantize:  # rows of 32 values: one Q8_0 block each
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", (len(tokens), HIDDEN), quantize=True)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        tensor(f"blk.{i}.attn_q.weight", (HEADS * head_dim, HIDDEN))
        tensor(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN))
        tensor(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        tensor(f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * head_dim))
        tensor(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
        tensor(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        tensor(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    tensor("output_norm.weight", (HIDDEN,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
