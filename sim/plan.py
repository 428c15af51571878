"""The plan: a scenario resolved once into what the floors below it take (design.md §2, "resolve once, pass down").

Every derived setting (weight, autocast, communication and adapter dtypes; host or device; versions and the
behaviours they select; world layout; DeepSpeed, NCCL and allocator settings; the device runtime) is decided once by
sim/resolve.py. The types here are plain frozen dataclasses that import nothing of the schema, so the schedule, the
workload, the parallel placements, the cost model and the allocators never see a `Scenario` or re-derive a setting.
"""

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from sim.allocator.alloc_conf import AllocConf
from sim.vocab import AllocatorBackend, AttnImplementation, DType, ModelType, Optim, QwenRemoteCode

if TYPE_CHECKING:  # the workload decides its behaviours (sim/workload/behaviour.py); the plan only carries them
    from sim.workload.behaviour import Behaviour

Version = tuple[int, int, int]


def format_version(version: Version) -> str:
    """A version tuple as users write it: (4, 36, 2) -> "4.36.2"."""
    return ".".join(map(str, version))


@dataclass(frozen=True, slots=True)
class MoeShape:
    """The mixture-of-experts keys of a config.json as the MoE config classes read them (transformers 5.24.0
    models/mixtral/configuration_mixtral.py, qwen2_moe, qwen3_moe), defaults filled in."""

    num_experts: int  # num_local_experts (Mixtral), num_experts (Qwen)
    experts_per_token: int  # num_experts_per_tok: the router's top k
    expert_intermediate_size: int  # intermediate_size (Mixtral), moe_intermediate_size (Qwen)
    norm_topk_prob: bool  # the top-k weights renormalised to sum 1 (Mixtral always; Qwen by config)
    sparse_layers: frozenset[int]  # the layers with a sparse MoE block; the others run the dense MLP
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    qkv_bias: bool = False  # Qwen2-MoE's q/k/v bias (Qwen2MoeConfig.qkv_bias, default True)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The shapes of a decoder-only model as its config.json gives them, with the dtype its weights load in."""

    model_type: ModelType
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_heads: int
    head_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    weights_dtype: DType
    attention_bias: bool
    mlp_bias: bool
    attention_dropout: float
    no_bias: bool  # Qwen1: no bias except c_attn
    sliding_window: int | None  # config.json's sliding_window (None where absent)
    use_sliding_window: bool  # Qwen2's switch for it (absent: False)
    sliding_layers: frozenset[int] = frozenset()  # "sliding_attention" layers (Gemma 2/3; Phi-3, Mistral: all)
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh soft-capping of the attention scores
    final_logit_softcapping: float | None = None  # Gemma 2: tanh soft-capping of the logits
    moe: MoeShape | None = None  # the routed experts of the MoE families (None: a dense model)


@dataclass(frozen=True, slots=True)
class LoraPlan:
    """PEFT LoraConfig as the modelling code uses it; `target_modules` is a tuple of names or "all-linear"."""

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...] | str
    modules_to_save: tuple[str, ...]
    adapter_dtype: DType  # the adapters' dtype: fp32 by PEFT's autocast_adapter_dtype, else the weights'


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """One rank's training loop: HF TrainingArguments as resolved (optim: the version's default where unset)."""

    micro_batch: int
    accumulation_steps: int
    seq_len: int
    gradient_checkpointing: bool
    use_reentrant: bool
    attn: AttnImplementation
    optim: Optim
    weight_decay: float
    max_grad_norm: float
    steps: int
    loss_check_syncs: bool = True  # logging_nan_inf_filter: the host waits for every micro-batch's loss

    @property
    def tokens_per_step(self) -> int:
        """This rank's tokens per optimizer step."""
        return self.micro_batch * self.seq_len * self.accumulation_steps


@dataclass(frozen=True, slots=True)
class Versions:
    """The versions whose behaviour is reproduced: packages as comparable tuples, Qwen1's remote code by revision."""

    torch: Version
    transformers: Version
    deepspeed: Version
    peft: Version
    bitsandbytes: Version
    qwen_remote_code: QwenRemoteCode


@dataclass(frozen=True, slots=True)
class World:
    """The data-parallel world: GPUs per node and nodes (one rank is simulated)."""

    gpus_per_node: int
    nodes: int

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device's capacity and rates (hardware/*.yaml) and the CUDA context it holds under the scenario's versions:
    what the cost model, NCCL, workspaces and the runtime read."""

    capacity_bytes: int
    compute_capability: str
    cuda_context: tuple["Reservation", ...]  # its named parts (sim/runtime.py cuda_context)
    nvlink_sharp: bool  # NVSwitch multicast: NCCL's NVLS buffers possible (hardware/*.yaml)
    peak_flops: dict[str, float]  # by "bf16", "fp16", "tf32", "fp32"
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    intra_node_latency_us: float
    inter_node_latency_us: float
    host_link_bytes_per_s: float  # PCIe, both directions together
    host_memory_bytes_per_s: float  # the host's DRAM, all sockets, shared by the node's GPUs
    gemm_efficiency: float
    attention_efficiency: float
    hbm_efficiency: float
    nvlink_efficiency: float
    network_efficiency: float
    pcie_efficiency: float
    host_memory_efficiency: float

    @property
    def cuda_context_bytes(self) -> int:
        """The CUDA context this device holds outside PyTorch's statistics, all parts together."""
        return sum(part.size_bytes for part in self.cuda_context)

    @property
    def compute_capability_major(self) -> int:
        """The major compute capability (8 when the catalog entry names none)."""
        return int((self.compute_capability or "8.0").split(".")[0])


@dataclass(frozen=True, slots=True)
class ZeroPlan:
    """DeepSpeed's zero_optimization after HF's "auto" resolution (deepspeed/runtime/zero/config.py names), with
    offload reduced to where it goes and what the inner optimizer makes."""

    stage: int
    contiguous_gradients: bool
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool | None
    sub_group_size: int
    stage3_prefetch_bucket_size: int
    stage3_param_persistence_threshold: int
    stage3_model_persistence_threshold: int
    stage3_max_live_parameters: int
    stage3_max_reuse_distance: int
    offload_param: bool  # parameters offloaded to the CPU (stage 3)
    offload_optimizer: bool  # optimizer states and step on the CPU
    inner_optimizer_temporaries: int  # fp32 temporaries of a sub-group's size in the inner optimizer's step
    communication_dtype: DType  # gradients are reduced in it


@dataclass(frozen=True, slots=True)
class NcclPlan:
    """NCCL's version, channels and buffers as this rank sets them up (sim/parallel/nccl.py)."""

    version: Version
    channels: int
    buffsize_bytes: int
    nvls: bool | None  # None: NCCL's default (on where NVLink SHARP exists)
    communicators: int


@dataclass(frozen=True, slots=True)
class AllocatorPlan:
    """The allocator backend and its PYTORCH_CUDA_ALLOC_CONF, parsed."""

    backend: AllocatorBackend
    conf: AllocConf


@dataclass(frozen=True, slots=True)
class Workspaces:
    """Library workspaces the caching allocator serves: cuBLAS's per thread, cuBLASLt's per bias GEMM."""

    cublas_bytes: int
    cublaslt_bytes: int
    cublaslt_persistent: bool  # kept per (handle, stream) instead of allocated per call


class ModuleLoading(Enum):
    """CUDA_MODULE_LOADING as the process runs with it: kernels loaded when first used, or all at context creation."""

    LAZY = "lazy"
    EAGER = "eager"


class Holder(Enum):
    """Who holds a piece of device memory outside PyTorch's statistics."""

    CUDA_CONTEXT = "cuda_context"
    NCCL = "nccl"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Device memory taken outside the caching allocator at `time_us` (0: before the first op), held to the end."""

    holder: Holder
    name: str
    size_bytes: int
    time_us: int = 0


@dataclass(frozen=True, slots=True)
class DeviceRuntime:
    """What the runtime under PyTorch holds (sim/runtime.py decides it): reservations outside PyTorch's statistics,
    and the library workspaces that PyTorch's allocator serves."""

    reservations: tuple[Reservation, ...]
    workspaces: Workspaces

    def non_pytorch_bytes(self, holder: Holder | None = None) -> int:
        """Bytes held outside PyTorch's statistics (by one holder, or all)."""
        return sum(r.size_bytes for r in self.reservations if holder is None or r.holder is holder)


@dataclass(frozen=True, slots=True)
class AmpPlan:
    """Mixed precision around the model's forward: torch.autocast's dtype, and whether accelerate's
    convert_outputs_to_fp32 copies the forward's bf16/fp16 outputs to fp32 (sim/resolve.py:amp decides)."""

    dtype: DType
    outputs_to_fp32: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """A scenario resolved once: everything the schedule, the engine and the allocator need, and nothing raw."""

    name: str
    model: ModelShape
    lora: LoraPlan | None
    training: TrainingPlan
    behaviour: "Behaviour"  # the modelling code's version-dependent choices
    amp: AmpPlan | None  # torch.autocast around the forward (and accelerate's fp32 outputs), else None
    on_host: bool  # a plain CPU host (calibration) rather than a CUDA device
    versions: Versions
    world: World
    device: DevicePlan
    zero: ZeroPlan | None  # None: no DeepSpeed ZeRO (stage 0 or no DeepSpeed)
    nccl: NcclPlan
    allocator: AllocatorPlan
    runtime: DeviceRuntime
    strategies: tuple = ()  # the scenario's what-if strategies, loaded (sim/strategies.py)

    @property
    def weights_dtype(self) -> DType:
        return self.model.weights_dtype

    @property
    def compute_dtype(self) -> DType:
        """The dtype the GEMMs run in: autocast's, else the weights'."""
        return self.amp.dtype if self.amp is not None else self.model.weights_dtype
