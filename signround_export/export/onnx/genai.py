"""onnxruntime-genai's genai_config.json: how to feed the graph build.py writes (its input and output
names, KV cache shapes) and how to search with it (greedy by default)."""

from __future__ import annotations

from ...checkpoint.format import Checkpoint
from ...model.config import ModelConfig
from ...model.folder import config_token_id


def genai_config(cfg: ModelConfig, ckpt: Checkpoint) -> dict:
    """onnxruntime-genai's genai_config.json for this graph."""
    eos = config_token_id(ckpt.path, ckpt.hf_config, "eos")
    pad = config_token_id(ckpt.path, ckpt.hf_config, "pad")
    return {
        "model": {
            "bos_token_id": config_token_id(ckpt.path, ckpt.hf_config, "bos"),
            "context_length": cfg.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": cfg.family.genai_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
