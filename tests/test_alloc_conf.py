"""PYTORCH_CUDA_ALLOC_CONF parsing (sim.allocator.alloc_conf), checked against c10/core/AllocatorConfig.cpp."""

import pytest

from sim.allocator.alloc_conf import K_LARGE_BUFFER, UNLIMITED, AllocConf, parse_alloc_conf
from sim.errors import ScenarioError

MiB = 1024 * 1024


def test_defaults() -> None:
    for text in (None, "", "   "):
        conf = parse_alloc_conf(text)
        assert conf.max_split_size_bytes is None
        assert conf.max_split_size == UNLIMITED
        assert conf.max_non_split_rounding_bytes == K_LARGE_BUFFER
        assert conf.roundup_power2_divisions == (0,) * 16
        assert conf.garbage_collection_threshold == 0.0
        assert conf.expandable_segments is False
    assert AllocConf() == parse_alloc_conf("")


def test_all_keys_together() -> None:
    conf = parse_alloc_conf(
        "max_split_size_mb:128, max_non_split_rounding_mb:64,garbage_collection_threshold:0.6,"
        "expandable_segments:True,backend:native,pinned_use_cuda_host_register:False,"
        "pinned_num_register_threads:8,release_lock_on_cudamalloc:True"
    )
    assert conf.max_split_size_bytes == 128 * MiB
    assert conf.max_non_split_rounding_bytes == 64 * MiB
    assert conf.garbage_collection_threshold == 0.6
    assert conf.expandable_segments is True
    assert conf.raw.startswith("max_split_size_mb:128")


def test_max_split_size_minimum_is_20() -> None:
    assert parse_alloc_conf("max_split_size_mb:20").max_split_size_bytes == 20 * MiB
    with pytest.raises(ScenarioError, match=r"^allocator\.conf: max_split_size_mb must be >= 20 \(got 10\)$"):
        parse_alloc_conf("max_split_size_mb:10")


def test_roundup_single_value_fills_every_interval() -> None:
    assert parse_alloc_conf("roundup_power2_divisions:4").roundup_power2_divisions == (4,) * 16


def test_roundup_bracket_form() -> None:
    conf = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]")
    div = conf.roundup_power2_divisions
    # keys are MiB; interval index = log2(key): 256 -> 8, 512 -> 9, 1024 -> 10.
    # The first key also fills intervals 0..7. '>' fills from the last key's interval (10, inclusive, as
    # PyTorch's std::fill(begin + last_index, end) does) to 15, so 1024:4 is overwritten by 8.
    assert div == (1,) * 8 + (1, 2) + (8,) * 6
    # a size of 600 MiB lies in [512 MiB, 1 GiB) -> index 9
    assert conf.divisions_for(600 * MiB) == 2
    # anything below 1 MiB uses interval 0; anything >= 32 GiB uses interval 15
    assert conf.divisions_for(1000) == 1
    assert conf.divisions_for(100 * 1024 * MiB) == 8


def test_roundup_bracket_zero_disables() -> None:
    div = parse_alloc_conf("roundup_power2_divisions:[1:4,64:0]").roundup_power2_divisions
    assert div[0] == 4 and div[6] == 0 and div[7] == 0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("max_split_size_mb:abc", "max_split_size_mb must be an integer (got 'abc')"),
        ("max_non_split_rounding_mb:5", "max_non_split_rounding_mb must be >= 20 (got 5)"),
        ("garbage_collection_threshold:1.0", "garbage_collection_threshold must be in (0, 1) (got 1.0)"),
        ("garbage_collection_threshold:0", "garbage_collection_threshold must be in (0, 1) (got 0)"),
        ("garbage_collection_threshold:x", "garbage_collection_threshold must be a number"),
        ("expandable_segments:true", "expandable_segments must be True or False (got 'true')"),
        ("roundup_power2_divisions:3", "divisions must be a power of 2 or 0 (got 3)"),
        ("roundup_power2_divisions:[300:2]", "interval keys must be powers of 2 in MB (got '300')"),
        ("roundup_power2_divisions:[256:2", "expected ']' closing roundup_power2_divisions at the end"),
        ("backend:cudaMallocAsync", "backend:cudaMallocAsync is a different allocator"),
        ("backend:foo", "backend must be native or cudaMallocAsync (got 'foo')"),
        ("max_split_size:128", "unrecognized option 'max_split_size'"),
        ("max_split_size_mb", "expected ':' after max_split_size_mb at the end"),
        ("max_split_size_mb:64;expandable_segments:True", "max_split_size_mb must be an integer"),
        ("expandable_segments:True expandable_segments:False", "expandable_segments must be True or False"),
    ],
)
def test_bad_strings(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_alloc_conf(text)
    message = str(info.value)
    assert message.startswith("allocator.conf: ")
    assert "\n" not in message
    assert needle in message


def test_snapshot_settings() -> None:
    settings = parse_alloc_conf("expandable_segments:True").allocator_settings()
    assert settings["expandable_segments"] is True
    assert settings["max_split_size"] == -1
    assert settings["roundup_power2_divisions"]["1"] == 0
