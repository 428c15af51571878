"""Shared fixtures and hypothesis profiles (`dev` is the default; CI may select `ci` with HYPOTHESIS_PROFILE)."""

import copy
import os

import numpy as np
from hypothesis import HealthCheck, settings

from sim.timeline import HostModel

settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TINY_MODEL = {
    "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256,
    "torch_dtype": "bfloat16",
}


def tiny_raw(**training) -> dict:
    """A raw scenario of a 2-layer, hidden-64 qwen2 on an A100; `training` keys override the defaults."""
    base = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "seq_len": 16, "bf16": True,
            "attn_implementation": "sdpa", "gradient_checkpointing": False}
    base.update(training)
    return {
        "name": "tiny",
        "model": copy.deepcopy(TINY_MODEL),
        "hardware": {"device": "a100-sxm4-80gb"},
        "software": {"torch": "2.2.2", "transformers": "4.39.3", "peft": "0.10.0"},
        "training": base,
        "allocator": {"backend": "exact"},
        "simulation": {"steps": 1},
    }


def synchronous_host(schedule) -> HostModel:
    """A host that costs nothing and issues each op only once the one before has ended (queue depth 0): a buffer
    record_stream'ed on its freeing op's stream is then back in the cache before the next malloc, as before the
    host was modelled."""
    return HostModel(np.zeros(len(schedule.ops), dtype=np.int64), 0)
