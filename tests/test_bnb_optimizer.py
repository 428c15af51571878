"""bitsandbytes' 8-bit AdamW as HF's Trainer makes it (optim adamw_bnb_8bit / adamw_8bit): its states per parameter
by the bitsandbytes and transformers versions, with the arithmetic, and what is refused."""

import pytest

from sim.errors import ScenarioError
from sim.report import summarize
from sim.scenario import build_scenario
from sim.simulate import run_scenario
from tests.conftest import tiny_raw

# The tiny Qwen2 of conftest: a 1000 x 64 embedding and an untied lm_head (64,000 elements each); per layer (2) four
# 64 x 64 attention projections (4,096), three 128 x 64 MLP projections (8,192) and five 64-element norms and biases;
# a 64-element final norm.
SMALL = 2 * 5 * 64 + 64  # below bitsandbytes' min_8bit_size (4,096): two fp32 states, 8 B per element
QMAPS = 2 * 256 * 4  # the "dynamic" and "udynamic" maps, once per optimizer


def eight_bit(numel: int, block: int) -> int:
    """Two uint8 states and two fp32 absmax per block."""
    return 2 * numel + 2 * 4 * -(-numel // block)


def layers(block: int) -> int:
    return 2 * (4 * eight_bit(4096, block) + 3 * eight_bit(8192, block))


def optimizer_states(transformers: str, bitsandbytes: str, optim: str = "adamw_bnb_8bit") -> int:
    raw = tiny_raw()
    raw["training"]["optim"] = optim
    raw["software"] = {"transformers": transformers, "bitsandbytes": bitsandbytes}
    return summarize(run_scenario(build_scenario(raw)))["model_states_bytes"]["optimizer_states"]


def test_states_by_bitsandbytes_blocksize() -> None:
    # bitsandbytes 0.43.3 quantises in blocks of 2,048 elements: the embedding 2·64,000 + 8·32 = 128,256 B, a 4,096
    # projection 8,192 + 8·2 = 8,208 B; from 0.44 in blocks of 256: 128,000 + 8·250 = 130,000 B and 8,192 + 8·16.
    # transformers 4.39 (4.30-4.51) leaves the embedding in 8 bits.
    assert optimizer_states("4.39.3", "0.43.3") == 2 * eight_bit(64000, 2048) + layers(2048) + 8 * SMALL + QMAPS \
        == 428352
    assert optimizer_states("4.39.3", "0.44.1") == 2 * eight_bit(64000, 256) + layers(256) + 8 * SMALL + QMAPS \
        == 434080


def test_the_trainer_keeps_embedding_states_in_fp32_from_transformers_4_52() -> None:
    # transformers 4.52+ registers a 32-bit override for nn.Embedding weights: model.embed_tokens gets two fp32
    # states (8 · 64,000 B); the untied lm_head is a Linear and stays in 8 bits. adamw_8bit is the same optimizer.
    expected = 8 * 64000 + eight_bit(64000, 256) + layers(256) + 8 * SMALL + QMAPS
    assert optimizer_states("5.24.0", "0.50.2") == expected == 816080
    assert optimizer_states("5.24.0", "0.50.2", "adamw_8bit") == expected


@pytest.mark.parametrize(("change", "message"), [
    ({"deepspeed": {"zero_optimization": {"stage": 2}}, "hardware": {"device": "a100-sxm4-80gb", "gpus_per_node": 2}},
     "with deepspeed is not modelled yet"),
    ({"training": {"optim": "adamw_8bit"}, "software": {"transformers": "4.29.2"}}, "no optimizer of transformers"),
])
def test_what_is_refused(change: dict, message: str) -> None:
    raw = tiny_raw()
    raw["training"]["optim"] = "adamw_bnb_8bit"
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ScenarioError, match=message):
        run_scenario(build_scenario(raw))
