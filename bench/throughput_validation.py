"""Step time and throughput against published measurements (docs/validation.md quotes the table it prints).

Usage: python bench/throughput_validation.py [--markdown PATH]
Each case names its source and what it had to assume. MosaicML's MPT models run through the llama modelling code
with MPT's widths and a SwiGLU width of 2/3 of MPT's 4·d GELU MLP, which gives the same parameters and FLOPs per
layer (the only architectural difference the cost model sees); FSDP FULL_SHARD is simulated as ZeRO-3 (the same
all-gathers and reduce-scatters).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.report import summarize  # noqa: E402
from sim.scenario import build_scenario  # noqa: E402
from sim.simulate import run_scenario  # noqa: E402

MOSAIC = ("mosaicml/llm-foundry scripts/train/benchmarking/README.md (FSDP FULL_SHARD, flash attention, amp_bf16, "
          "8 GPUs in one node)")


def mpt(d_model: int, layers: int, heads: int) -> dict:
    return {"model_type": "llama", "hidden_size": d_model, "intermediate_size": round(8 * d_model / 3),
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "vocab_size": 50368, "tie_word_embeddings": True, "max_position_embeddings": 8192,
            "torch_dtype": "bfloat16"}


def case(model, device: str, gpus: int, seq: int, micro: int, accumulation: int, checkpointing: bool,
         attention: str = "flash_attention_2") -> dict:
    return {
        "model": model, "hardware": {"device": device, "gpus_per_node": gpus},
        "software": {"torch": "2.2.2", "transformers": "4.39.3", "deepspeed": "0.14.0"},
        "training": {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
                     "seq_len": seq, "bf16": True, "gradient_checkpointing": checkpointing,
                     "attn_implementation": attention},
        "deepspeed": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                            "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                            "stage3_param_persistence_threshold": "auto"}},
        "allocator": {"backend": "exact"},  # time only: the memory verdict does not change the clock
    }


# (label, raw scenario, measured tokens/s per GPU, measured step time s, source, assumptions)
CASES = [
    ("MPT-7B, 8×A100-80GB, 2k, mb 6 × GA 2, no AC", case(mpt(4096, 32, 32), "a100-sxm4-80gb", 8, 2048, 6, 2, False),
     4641, 5.30, MOSAIC, "step time = 96 × 2048 tokens / 37,130 tokens/s"),
    ("MPT-7B, 8×A100-80GB, 4k, mb 16 × GA 2, AC", case(mpt(4096, 32, 32), "a100-sxm4-80gb", 8, 4096, 16, 2, True),
     3684, 35.6, MOSAIC, ""),
    ("MPT-13B, 8×A100-80GB, 2k, mb 2 × GA 3, no AC", case(mpt(5120, 40, 40), "a100-sxm4-80gb", 8, 2048, 2, 3, False),
     2262, 5.43, MOSAIC, ""),
    ("MPT-7B, 8×H100-80GB, 2k, mb 6 × GA 1, no AC", case(mpt(4096, 32, 32), "h100-sxm-80gb", 8, 2048, 6, 1, False),
     10643, 1.155, MOSAIC, ""),
    ("Granite-7B (Llama-2-7B), 4×A100-80GB, DeepSpeed ZeRO-3", case("llama-2-7b", "a100-sxm4-80gb", 4, 4096, 1, 8,
                                                                    True, "sdpa"),
     3094.5, 10.6, "huggingface/blog deepspeed-to-fsdp-and-back.md, Table 3 (accelerate + DeepSpeed 0.14, torch 2.2)",
     "not stated there: seq 4096 and 8 sequences per GPU per step (from 3094.5 tokens/s × 10.6 s), "
     "micro-batch 1 × GA 8, checkpointing on, SDPA, A100 80GB"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    args = parser.parse_args()
    header = "| case | measured tokens/s/GPU | simulated | error | measured step s | simulated | MFU (sim) |"
    rows = [header, "|---|---|---|---|---|---|---|"]
    notes = []
    for number, (label, raw, tokens_per_gpu, step_s, source, assumed) in enumerate(CASES, 1):
        result = summarize(run_scenario(build_scenario(raw)))
        simulated = result["tokens_per_s"] / result["hardware"]["gpus"]
        error = simulated / tokens_per_gpu - 1
        rows.append(f"| T{number} {label} | {tokens_per_gpu:,.0f} | {simulated:,.0f} | {100 * error:+.1f}% | "
                    f"{step_s:.2f} | {result['step_time_s']:.2f} | {100 * result['mfu']:.1f}% |")
        notes.append(f"- T{number}: {source}" + (f"; {assumed}" if assumed else ""))
    text = "\n".join(rows + [""] + notes)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
