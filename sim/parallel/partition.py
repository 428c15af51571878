"""DeepSpeed's partition arithmetic and its own memory estimators, as pure functions."""

import math


def padded_partition_numel(numel: int, world: int) -> int:
    """ZeRO-3 _partition_param: pad numel to a multiple of the world size, each rank owns numel_padded / world."""
    return math.ceil(numel / world)


def flat_partition_numel(total_numel: int, world: int, alignment: int = 2) -> int:
    """ZeRO-1/2 (stage_1_and_2.py): the flat bf16 group is padded to a multiple of world × alignment
    (NCCL start alignment factor 2 for 16-bit, runtime/utils.py get_alignment_padding) and split evenly."""
    unit = world * alignment
    return math.ceil(total_numel / unit) * unit // world


def estimate_zero2_model_states(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                cpu_offload: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, float]:
    """deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs: (GPU bytes, CPU bytes).
    18 = 2 (fp16 grads) + 4 (fp32 grads) + 4 (fp32 params) + 8 (Adam)."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / total_gpus)
        cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(gpu), cpu


def estimate_zero3_model_states(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                                zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, float]:
    """deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs: (GPU bytes, CPU bytes)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu = largest_layer_memory
            cpu = (total_params * 18 * gpus_factor if zero_init
                   else total_params * max(4 * num_gpus_per_node, 18 * gpus_factor)) * additional_buffer_factor
        else:
            gpu = largest_layer_memory + int(2 * total_params / total_gpus)
            cpu = (total_params * 16 * gpus_factor if zero_init
                   else total_params * max(4 * num_gpus_per_node, 16 * gpus_factor)) * additional_buffer_factor
    else:
        gpu = largest_layer_memory + int(18 * total_params / total_gpus)
        cpu = (largest_layer_params * 4 * num_gpus_per_node if zero_init
               else total_params * 4 * num_gpus_per_node) * additional_buffer_factor
    return int(gpu), cpu
