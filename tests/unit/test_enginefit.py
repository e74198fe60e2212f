"""The split of a reservation inside its engine: one rule for admission and for the engine's arguments."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manager.control.enginefit import (
    CPU_SEQUENCE_BYTES,
    DEFAULT_MAX_NUM_SEQS,
    KV_BLOCK_TOKENS,
    LOGITS_COPIES,
    MAX_NUM_BATCHED_TOKENS,
    MIN_KV_CACHE,
    Terms,
    fit,
    minimum,
)
from manager.control.modelfit import ModelFootprint
from manager.errors import InvalidInput
from manager.platform import PLATFORMS

M = 1024**2
G = 1024**3
OVERHEAD = 1152 * M
# the demo model's figures (read_footprint of the real one): 2.6 MB of weights, a 2,048-word vocabulary
DEMO = ModelFootprint("demo", 1_310_720, 2_621_440, 1024, (5 * 256 + 3 * 512) * 2, 2048 * 4)
# a Qwen3-VL-8B-class text model: 16 GiB of weights, 152k words, hidden 4096, intermediate 12288
LARGE = ModelFootprint("large", 8 * 10**9, 16 * G, 144 * 1024, (5 * 4096 + 3 * 12288) * 2, 151_936 * 4)


def terms(mode: str = "cpu", **kw: int) -> Terms:
    args: dict[str, int] = {"overhead": OVERHEAD, "images": 0, "max_model_len": 512, "min_kv_tokens": 256, **kw}
    return Terms(PLATFORMS[mode], **args)


def split(reservation: int, footprint: ModelFootprint = DEMO, mode: str = "cpu", **kw: int):  # type: ignore[no-untyped-def]
    return fit(reservation, footprint, terms(mode, **kw))


def test_a_roomy_reservation_runs_vllms_default_and_the_rest_is_kv_cache() -> None:
    f = split(1536 * M)
    assert f.max_num_seqs == DEFAULT_MAX_NUM_SEQS and f.max_num_batched_tokens == MAX_NUM_BATCHED_TOKENS
    per_sequence = 2048 * 4 * LOGITS_COPIES + CPU_SEQUENCE_BYTES
    assert f.per_sequence == per_sequence
    assert f.activations == DEMO.activation_bytes_per_token * MAX_NUM_BATCHED_TOKENS
    assert f.kv_cache == 1536 * M - OVERHEAD - DEMO.weight_bytes - f.activations - 128 * per_sequence
    assert not f.seqs_from_tenant


def test_a_small_reservation_runs_fewer_sequences_instead_of_growing_past_its_limit() -> None:
    least = minimum(DEMO, terms())
    f = split(least)
    assert f.max_num_seqs == 1 and f.kv_cache == MIN_KV_CACHE == f.kv_floor
    ten = split(least + 9 * f.per_sequence)
    assert ten.max_num_seqs == 10 and ten.kv_cache == MIN_KV_CACHE
    with pytest.raises(InvalidInput, match=rf"cannot hold the engine: .* reserve at least {-(-least // M)} MiB"):
        split(least - 1)


def test_the_tenants_own_max_num_seqs_is_held_or_refused_with_the_numbers() -> None:
    f = split(1536 * M, max_num_seqs=8)
    assert f.max_num_seqs == 8 and f.seqs_from_tenant
    assert f.kv_cache == 1536 * M - OVERHEAD - DEMO.weight_bytes - f.activations - 8 * f.per_sequence
    with pytest.raises(InvalidInput, match=r"4000 x 0\.52 MiB per running sequence.*lower --max-num-seqs"):
        split(1536 * M, max_num_seqs=4000)
    # more sequences than batched tokens: vLLM takes at least as many tokens, and they are counted
    many = split(12 * G, max_num_seqs=4096)
    assert many.max_num_batched_tokens == 4096 and many.activations == DEMO.activation_bytes_per_token * 4096


def test_images_come_out_of_the_kv_cache_and_are_named_when_they_do_not_fit() -> None:
    decode = 4 * 4096 * 3072 * 21
    assert split(3 * G, images=decode).kv_cache == split(3 * G).kv_cache - decode
    with pytest.raises(InvalidInput, match=r"for images.*lower --max-images / --max-image-pixels"):
        split(2 * G, images=decode)


def test_on_a_gpu_the_activations_are_vllms_profile_inside_the_overhead() -> None:
    f = split(40 * G, LARGE, "nvml", overhead=3 * G, max_model_len=8192)
    assert f.activations == 0 and f.per_sequence == 151_936 * 4 * LOGITS_COPIES
    assert f.max_num_seqs == DEFAULT_MAX_NUM_SEQS
    # one whole context and vLLM's null block, in 128-token blocks; no CPU floor
    assert f.kv_floor == 144 * 1024 * (8192 + KV_BLOCK_TOKENS)
    tight = minimum(LARGE, terms("nvml", overhead=3 * G, max_model_len=8192))
    assert split(tight + 4 * f.per_sequence, LARGE, "nvml", overhead=3 * G, max_model_len=8192).max_num_seqs == 5


@given(
    extra=st.integers(min_value=0, max_value=8 * G),
    seqs=st.one_of(st.none(), st.integers(min_value=1, max_value=4096)),
    images=st.integers(min_value=0, max_value=2 * G),
    mode=st.sampled_from(["cpu", "nvml"]),
)
def test_the_parts_always_add_up_to_the_reservation(extra: int, seqs: int | None, images: int, mode: str) -> None:
    least = minimum(DEMO, terms(mode, images=images, max_num_seqs=seqs or 0))
    f = split(least + extra, mode=mode, images=images, max_num_seqs=seqs or 0)
    parts = f.overhead + f.weights + f.images + f.activations + f.max_num_seqs * f.per_sequence + f.kv_cache
    assert parts == f.reservation == least + extra
    assert f.kv_cache >= f.kv_floor and 1 <= f.max_num_seqs <= max(seqs or 0, DEFAULT_MAX_NUM_SEQS)


def test_the_kv_floor_holds_what_vllm_checks_whole_blocks_and_its_null_block() -> None:
    """SmolLM2-135M at a 2048-token context: 30 layers x 3 KV heads x 64 x 2 (K, V) x 2 bytes is
    23,040 bytes a token. vLLM 0.32 starts only when its KV cache holds the context's 16 blocks of
    128 tokens plus the null block it holds back: 17 blocks, not the context's 2048 tokens (an engine
    given 2048 tokens' worth refused to start, "estimated maximum model length is 1920")."""
    smollm2 = ModelFootprint("smollm2", 134_515_008, 269_030_016, 23_040, (5 * 576 + 3 * 1536) * 2, 49_152 * 4)
    f = split(minimum(smollm2, terms(max_model_len=2048)), smollm2, max_model_len=2048)
    assert f.kv_cache >= f.kv_floor == 17 * KV_BLOCK_TOKENS * 23_040 > 2048 * 23_040 > MIN_KV_CACHE
