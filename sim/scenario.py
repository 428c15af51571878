"""The scenario schema (design.md §3): loading, `--set` overrides, catalog references.

Raw YAML → references resolved (devices here; config.json, DeepSpeed JSON and trainer names by the readers in
sim/ingest/) → overrides → pydantic validation → a frozen `Scenario`. Every user error becomes a `ScenarioError`
naming the key path and the value. Settings derived from it are decided once, later, by sim/resolve.py.
"""

import copy
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from sim import catalog
from sim.errors import MAX_TENSOR_BYTES, ScenarioError
from sim.ingest.accelerate_config import apply_launch
from sim.ingest.deepspeed import classify_deepspeed, read_deepspeed, resolve_auto
from sim.ingest.formats import Converted, Format, convert
from sim.ingest.hf_config import normalize_config, read_model
from sim.ingest.keys import IgnoredKey
from sim.ingest.peft import classify_lora
from sim.ingest.provenance import origins
from sim.ingest.training_args import (
    PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT,
    SEQ_LEN_ALIASES,
    classify_training,
    resolve_seq_len_alias,
    take_deepspeed,
)
from sim.vocab import AllocatorBackend, AttnImplementation, DType, ModelType, Optim, QwenRemoteCode
from sim.versions import (
    NEWEST_BITSANDBYTES,
    NEWEST_DEEPSPEED,
    NEWEST_PEFT,
    NEWEST_TORCH,
    NEWEST_TRANSFORMERS,
    known_release,
    parse_version,
)


def _whole_number(value: Any) -> Any:
    """DeepSpeed and YAML users write 1e9 or 5e8 (which YAML 1.1 reads as a string): accept whole numbers
    written that way as ints. Booleans are not sizes."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _at_most(limit: int, what: str) -> Callable[[Any], Any]:
    """A bound on a whole number, checked after `_whole_number`, whose message says why the limit is physical."""

    def check(value: Any) -> Any:
        if isinstance(value, int) and value > limit:
            raise ValueError(f"more than {what}")
        return value

    return check


def _no_boolean(value: Any) -> Any:
    """YAML's `true` is not the number 1.0 (pydantic's lax float would take it)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# Every count of elements or bytes (shapes, buckets, batch, sequence): no tensor, bucket or buffer is larger than the
# largest tensor a device could address (sim/errors.py MAX_TENSOR_BYTES, 2^62), so no larger count is physical, and
# any product of two of them is checked by the tape in Python integers before it reaches the int64 core.
_MAX_COUNT = _at_most(MAX_TENSOR_BYTES, "2^62, the most elements or bytes any device could address")
# DeepSpeed's stage3_model_persistence_threshold defaults to sys.maxsize (deepspeed/runtime/zero/config.py
# DeepSpeedZeroConfig: model_persistence_threshold = Field(pp_int(sys.maxsize, ...))): an int64 bound, no more.
_MAX_INT64 = _at_most(2**63 - 1, "2^63 - 1, the largest 64-bit integer")
# A device memory: the largest GPU memories are below 2^38 bytes (H200: 141 GB); 2^50 bytes (1 PiB) is far above any
# device built and keeps every byte count of a run within int64.
MAX_DEVICE_BYTES = 1 << 50
_MAX_DEVICE_BYTES = _at_most(MAX_DEVICE_BYTES, "2^50 bytes (1 PiB), far above any device memory")

Count = Annotated[int, BeforeValidator(_whole_number), AfterValidator(_MAX_COUNT), Field(ge=0)]
PositiveCount = Annotated[int, BeforeValidator(_whole_number), AfterValidator(_MAX_COUNT), Field(gt=0)]
DeviceBytes = Annotated[int, BeforeValidator(_whole_number), AfterValidator(_MAX_DEVICE_BYTES)]
# A real number as a scenario writes it: finite (no .inf/.nan: they would reach the report as Infinity, not JSON)
# and never a boolean.
Real = Annotated[float, BeforeValidator(_no_boolean), Field(allow_inf_nan=False)]
# Device figures within what is physical, so every op time is finite and positive: the fastest GPUs peak below
# 1e16 FLOP/s (H200 dense FP8: 1.98e15) and move below 1e13 B/s (H200 HBM3e: 4.8e12); the bounds leave three orders
# of magnitude above that (tests/test_model_flops.py's roofline-free device uses 1e18) and refuse figures so small
# that a step's time would leave float range. Latencies: NCCL's per-step figures are microseconds
# (NVIDIA/nccl src/graph/tuning.cc hwLat); one second is far above any link.
Flops = Annotated[Real, Field(ge=1e6, le=1e18)]
BytesPerS = Annotated[Real, Field(ge=1e6, le=1e18)]
LatencyUs = Annotated[Real, Field(ge=0.0, le=1e6)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(BaseModel):
    """A HF config.json. Known keys are typed; the many other keys a real config.json carries are kept as-is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model_type: ModelType
    hidden_size: PositiveCount
    intermediate_size: PositiveCount
    num_hidden_layers: PositiveCount
    num_attention_heads: PositiveCount
    num_key_value_heads: PositiveCount | None = None
    head_dim: PositiveCount | None = None
    vocab_size: PositiveCount
    max_position_embeddings: PositiveCount = 2048
    tie_word_embeddings: bool = False
    torch_dtype: DType | None = None
    attention_bias: bool = False  # llama/mistral: bias on q/k/v/o (LlamaConfig default False)
    mlp_bias: bool = False
    hidden_act: Literal["silu", "gelu", "gelu_pytorch_tanh"] = "silu"  # the GELUs: Gemma only (sim/resolve.py)
    attention_dropout: Real = Field(default=0.0, ge=0.0, lt=1.0)
    kv_channels: PositiveCount | None = None  # Qwen1
    no_bias: bool = True  # Qwen1: no bias except c_attn

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.torch_dtype is not None and not self.torch_dtype.is_floating:
            raise ValueError(f"torch_dtype must be a floating dtype, not {self.torch_dtype.value}")
        heads, kv = self.num_attention_heads, self.kv_heads
        if self.head_dim is None and self.kv_channels is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {heads}"
            )
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
        if self.model_type is ModelType.QWEN and kv != heads:
            raise ValueError(f"model_type qwen is multi-head attention: num_key_value_heads {kv} must equal "
                             f"num_attention_heads {heads}")
        if self.num_hidden_layers * self.hidden_size * self.intermediate_size > MAX_TENSOR_BYTES:
            # every layer holds its MLP, at least hidden x intermediate weights of at least one byte (Qwen1's
            # w1/w2/c_proj: 1.5x that; gate/up/down: 3x), so the weights alone pass what a device could address
            raise ValueError(f"num_hidden_layers {self.num_hidden_layers} x hidden_size {self.hidden_size} x "
                             f"intermediate_size {self.intermediate_size}: the MLP weights alone are more than 2^62 "
                             "bytes, the most any device could address")
        if self.model_type is ModelType.QWEN and self.intermediate_size % 2:
            raise ValueError(
                f"intermediate_size {self.intermediate_size} must be even for model_type qwen (w1 and w2 each take half)"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def weights_dtype(self) -> DType:
        """Dtype the weights are loaded in: config torch_dtype (from_pretrained(torch_dtype="auto") as trainers do)."""
        return self.torch_dtype or DType.FLOAT32


Fraction = Annotated[Real, Field(gt=0, le=1)]


class DeviceEfficiency(Frozen):
    """Achievable fractions of the datasheet peaks, as measured (hardware/*.yaml cites each); 1.0 everywhere is
    the bare roofline. gemm: large bf16/fp16 matmuls; attention: fused (flash) attention kernels; hbm: streaming
    kernels; nvlink: NCCL bus bandwidth inside a node over the per-direction NVLink figure; network: the same
    across nodes over the per-GPU NIC figure; pcie: pinned host-device copies over the per-direction PCIe figure;
    host_memory: the host's streaming bandwidth over its DRAM figure."""

    gemm: Fraction = 1.0
    attention: Fraction = 1.0
    hbm: Fraction = 1.0
    nvlink: Fraction = 1.0
    network: Fraction = 1.0
    pcie: Fraction = 1.0
    host_memory: Fraction = 1.0


class DeviceSpec(Frozen):
    """A device as hardware/*.yaml describes it. `cuda_context_bytes` overrides the CUDA context that sim/runtime.py
    models from the versions (absent: modelled); `cuda_context_bytes: 0` with the exact allocator is a plain host."""

    name: str
    description: str = ""
    capacity_bytes: Annotated[DeviceBytes, Field(gt=0)]
    compute_capability: str = ""
    cuda_context_bytes: Annotated[DeviceBytes, Field(ge=0)] | None = None
    # NVLink SHARP (NVSwitch multicast): NCCL builds its NVLS buffers only where the device reports
    # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED (NVIDIA/nccl src/transport/nvls.cc), i.e. Hopper behind NVSwitch (HGX);
    # false for PCIe and NVLink-bridge parts
    nvlink_sharp: bool = True
    # at least one peak: sim/cost.py falls back to the largest given for a precision the device does not list
    peak_flops: Annotated[dict[Literal["bf16", "fp16", "tf32", "fp32"], Flops], Field(min_length=1)]
    hbm_bytes_per_s: BytesPerS
    intra_node_bytes_per_s: BytesPerS = 1e11
    inter_node_bytes_per_s: BytesPerS = 1e10
    intra_node_latency_us: LatencyUs = 0.0
    inter_node_latency_us: LatencyUs = 0.0
    # the GPU's PCIe link to the host, both directions together as datasheets quote it (one direction carries half);
    # default PCIe Gen4 x16, 64 GB/s (NVIDIA A100 datasheet)
    host_link_bytes_per_s: BytesPerS = 64e9
    # the host's DRAM bandwidth, all sockets, shared by the node's GPUs' host work (CPU Adam); default the DGX A100's
    # 2 AMD EPYC 7742, 8 channels of DDR4-3200 each: 2 x 204.8 GB/s (AMD EPYC 7742 product page, DGX A100 datasheet)
    host_memory_bytes_per_s: BytesPerS = 409.6e9
    efficiency: DeviceEfficiency = DeviceEfficiency()


# The largest NVLink domain: NVLink Switch connects up to 576 GPUs (https://www.nvidia.com/en-us/data-center/nvlink/,
# fifth-generation NVLink); a node of the simulator is the GPUs on one NVLink fabric.
MAX_GPUS_PER_NODE = 576
# The largest training clusters announced hold about 2e5 GPUs (xAI Colossus: 200,000, 2025); 2^20 is five times that
# and keeps every per-rank count and byte figure far inside int64.
MAX_GPUS = 1 << 20


class Hardware(Frozen):
    device: DeviceSpec
    device_name: str
    gpus_per_node: Annotated[PositiveCount, AfterValidator(
        _at_most(MAX_GPUS_PER_NODE, "576, the most GPUs one NVLink domain connects"))] = 1
    nodes: PositiveCount = 1

    @model_validator(mode="after")
    def _cluster_size(self) -> "Hardware":
        if self.gpus > MAX_GPUS:
            raise ValueError(f"nodes: {self.nodes} nodes x {self.gpus_per_node} GPUs is more than 2^20 GPUs, five "
                             "times the largest cluster built")
        return self

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


class Software(Frozen):
    torch: str = NEWEST_TORCH
    transformers: str = NEWEST_TRANSFORMERS
    deepspeed: str = NEWEST_DEEPSPEED
    peft: str = NEWEST_PEFT
    bitsandbytes: str = NEWEST_BITSANDBYTES
    qwen_remote_code: QwenRemoteCode = QwenRemoteCode.FINAL  # model_type qwen only

    @model_validator(mode="after")
    def _known_releases(self) -> "Software":
        """Each version a release the simulator knows (sim/versions.py), never silently another."""
        for package in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes"):
            known_release(package, getattr(self, package), f"software.{package}")
        return self

    def version(self, package: str) -> tuple[int, int, int]:
        """The named package's version as a comparable tuple."""
        return parse_version(getattr(self, package), f"software.{package}")


class CheckpointingKwargs(Frozen):
    use_reentrant: bool | None = None  # None: the transformers version's default (sim/resolve.py)


class Training(Frozen):
    per_device_train_batch_size: PositiveCount = PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT
    gradient_accumulation_steps: PositiveCount = 1
    seq_len: PositiveCount
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: CheckpointingKwargs = CheckpointingKwargs()
    attn_implementation: AttnImplementation = AttnImplementation.SDPA
    optim: Optim | None = None  # None: the TrainingArguments default of the transformers version
    weight_decay: Real = Field(default=0.0, ge=0.0)
    max_grad_norm: Real = Field(default=1.0, ge=0.0)
    logging_nan_inf_filter: bool = True  # TrainingArguments default: the Trainer checks each micro-batch's loss

    @model_validator(mode="after")
    def _one_precision(self) -> "Training":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        return self


def _some_target(value: Any) -> Any:
    """At least one target module: PEFT refuses a LoraConfig that matches no module (huggingface/peft
    src/peft/tuners/tuners_utils.py BaseTuner.inject_adapter raises "Target modules ... not found in the base
    model" when no module matched, as an empty list never does), where the simulator would train nothing."""
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("an empty list matches no module, and PEFT refuses it (Target modules [] not found in the "
                         "base model); name at least one, or \"all-linear\"")
    return value


class Lora(Frozen):
    """PEFT LoraConfig names."""

    r: PositiveCount = 8
    lora_alpha: Real = 8
    lora_dropout: Real = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: Annotated[list[str] | Literal["all-linear"], BeforeValidator(_some_target)] = ["q_proj", "v_proj"]
    modules_to_save: list[str] = []
    bias: Literal["none"] = "none"
    use_rslora: bool = False


class ZeroOptimization(Frozen):
    """deepspeed/runtime/zero/config.py names and defaults (ZeRO config forbids unknown keys there too)."""

    stage: Literal[0, 1, 2, 3] = 0
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: Count = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: Count = 500_000_000
    overlap_comm: bool | None = None
    round_robin_gradients: bool = False
    sub_group_size: Count = 1_000_000_000
    stage3_prefetch_bucket_size: Count = 50_000_000
    stage3_param_persistence_threshold: Count = 100_000
    stage3_model_persistence_threshold: Annotated[int, BeforeValidator(_whole_number), AfterValidator(_MAX_INT64),
                                                  Field(ge=0)] = 2**63 - 1
    stage3_max_live_parameters: Count = 1_000_000_000
    stage3_max_reuse_distance: Count = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    offload_param: dict[str, Any] | None = None
    offload_optimizer: dict[str, Any] | None = None


class DeepSpeed(BaseModel):
    """A DeepSpeed JSON after HF Trainer's "auto" resolution; keys other than zero_optimization are kept as-is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    zero_optimization: ZeroOptimization = ZeroOptimization()

    @model_validator(mode="after")
    def _sections_are_mappings(self) -> "DeepSpeed":
        """The sections sim/resolve.py reads are JSON objects in DeepSpeed's config (deepspeed/runtime/config.py
        reads param_dict[DATA_TYPES], [BFLOAT16], [FP16] and [OPTIMIZER] with .get): anything else is refused."""
        for section in ("data_types", "bf16", "bfloat16", "fp16", "optimizer"):
            value = (self.model_extra or {}).get(section)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{section}: expected a mapping (got {value!r})")
        return self


class Allocator(Frozen):
    backend: AllocatorBackend | None = None  # None: caching on a GPU, exact on a plain host
    conf: str = ""


class Nccl(Frozen):
    """NCCL's own GPU memory (outside PyTorch's statistics, sim/parallel/nccl.py); None = NCCL's default."""

    version: str | None = None  # default: the NCCL that the named torch's PyPI wheel pins
    channels: PositiveCount | None = None  # NCCL_MIN/MAX_NCHANNELS; default 24 (8-GPU NVSwitch nodes)
    buffsize_bytes: PositiveCount = 4194304  # NCCL_BUFFSIZE (src/include/device.h DEFAULT_BUFFSIZE 1 << 22)
    nvls: bool | None = None  # NCCL_NVLS_ENABLE; default: on where NVLink SHARP exists (sm90, > 2 GPUs in a node)
    communicators: Count | None = None  # default: as created


class Simulation(Frozen):
    steps: PositiveCount = 2


class Strategy(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str


class Scenario(Frozen):
    """A validated scenario (design.md §3)."""

    name: str
    model: ModelSpec
    model_name: str
    hardware: Hardware
    software: Software = Software()
    training: Training
    lora: Lora | None = None
    deepspeed: DeepSpeed | None = None
    allocator: Allocator = Allocator()
    nccl: Nccl = Nccl()
    simulation: Simulation = Simulation()
    strategies: list[Strategy] = []
    ignored_keys: tuple[IgnoredKey, ...] = ()  # accepted with no memory effect (sim/ingest/keys.py), not a user key
    origins: dict[str, str] = {}  # deciding setting -> where it came from (sim/ingest/provenance.py), not a user key

    @model_validator(mode="after")
    def _default_allocator(self) -> "Scenario":
        """The caching allocator on a GPU; the exact count on a device with no CUDA context (a plain host)."""
        if self.allocator.backend is None:
            host = self.hardware.device.cuda_context_bytes == 0
            backend = AllocatorBackend.EXACT if host else AllocatorBackend.CACHING
            object.__setattr__(self, "allocator", self.allocator.model_copy(update={"backend": backend}))
        return self

    @model_validator(mode="after")
    def _unused_deepspeed_version(self) -> "Scenario":
        """`software.deepspeed` given with no deepspeed section changes nothing (DeepSpeed does not run): listed
        with the other ignored keys, not silently accepted."""
        if self.deepspeed is None and "deepspeed" in self.software.model_fields_set:
            unused = IgnoredKey("software.deepspeed", self.software.deepspeed,
                                "no deepspeed section: DeepSpeed does not run, so its version changes nothing")
            object.__setattr__(self, "ignored_keys", (*self.ignored_keys, unused))
        return self


_TOP_KEYS = {
    "name", "model", "hardware", "software", "training", "lora", "deepspeed", "allocator", "nccl", "simulation",
    "strategies",
}


def load_scenario(path: str | Path, overrides: list[str] = (), fmt: Format | None = None,
                  launch: str | Path | None = None) -> Scenario:
    """Read a scenario file or a training tool's file (sim/ingest/formats.py; `launch`: an accelerate config),
    resolve its references, apply `--set KEY=VALUE` overrides, validate."""
    path = Path(path)
    converted = convert(catalog.load_yaml_mapping(path, "scenario"), path, fmt)
    if launch is not None:
        apply_launch(converted, Path(launch))
    try:
        return build_scenario(converted.raw, base_dir=path.parent, overrides=overrides, default_name=path.stem,
                              source=path.name, converted=converted)
    except ScenarioError as exc:
        raise ScenarioError(converted.locate(str(exc))) from None


def build_scenario(
    raw: dict, base_dir: Path = Path("."), overrides: list[str] = (), default_name: str = "scenario",
    source: str = "the scenario", converted: Converted | None = None,
) -> Scenario:
    """Validate a raw scenario mapping (as loaded from YAML; `source` names its file; `converted`: what a tool's
    file's conversion adds) into a frozen Scenario."""
    converted = converted or Converted(raw)
    data = copy.deepcopy(raw)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ScenarioError(f"{unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    if "model" in data:
        _resolve_model(data, base_dir)
    no_device = bool(converted.missing) and isinstance(data.get("hardware"), dict) and "device" not in data["hardware"]
    if "hardware" in data and not no_device:  # a tool's file: only the GPU count from --launch, the device --set
        _resolve_device(data)
    _read_deepspeed(data, base_dir)
    for override in overrides:
        _apply_override(data, override, base_dir)
    _read_deepspeed(data, base_dir, overridden=True)
    if no_device and isinstance(data.get("hardware"), dict) and "device" not in data["hardware"]:
        data.pop("hardware")
    for key in ("model", "hardware"):
        if key not in data:
            raise ScenarioError(converted.missing.get(key, f"{key}: required key is missing"))
    if isinstance(data.get("training"), dict):
        resolve_seq_len_alias(data["training"])
    model_file = data.pop("_model_file", "")
    if isinstance(data.get("model"), dict):
        normalize_config(data["model"], model_file)
    data.setdefault("name", default_name)
    model_name = data.pop("_model_name", "inline")
    device_name = data.get("hardware", {}).pop("_device_name", "inline") if isinstance(data.get("hardware"), dict) else ""
    set_paths = list(data.get("_set", []))
    ignored, data["origins"] = _classify(data, source, model_file)
    data["origins"].update({path: origin for path, origin in converted.defaults.items()
                            if path in data["origins"] and not any(path == s or path.startswith(s + ".")
                                                                   for s in set_paths)})
    data["ignored_keys"] = tuple(converted.ignored + ignored)
    try:
        hardware = data.get("hardware")
        if isinstance(hardware, dict):
            hardware["device_name"] = device_name
        return Scenario(**data, model_name=model_name)
    except ValidationError as exc:
        raise ScenarioError(_describe(exc)) from None
    except TypeError as exc:
        raise ScenarioError(f"scenario: {exc}") from None


def _read_deepspeed(data: dict, base_dir: Path, overridden: bool = False) -> None:
    """TrainingArguments' `deepspeed` moved to the top level (after the overrides, a `--set training.deepspeed`
    replaces it), and a path read, remembering its file."""
    training = data.get("training")
    if isinstance(training, dict) and overridden and "deepspeed" in training:
        data["deepspeed"] = training.pop("deepspeed")
    elif isinstance(training, dict):
        data["deepspeed"] = take_deepspeed(training, data.get("deepspeed"))
    if not isinstance(data.get("deepspeed"), dict):
        data["deepspeed"], data["_deepspeed_file"] = read_deepspeed(data.get("deepspeed"), base_dir)


def _classify(data: dict, source: str, model_file: str) -> tuple[list[IgnoredKey], dict[str, str]]:
    """Every key of training, lora and deepspeed classified (sim/ingest/keys.py); where each deciding setting came
    from (before "auto" is filled); DeepSpeed's "auto" filled and its batch sizes reconciled with TrainingArguments,
    whose neutral keys (learning_rate...) HF compares too."""
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    in_scenario = f" (in {source})" if source.endswith((".yaml", ".yml", ".json")) else ""
    ignored = classify_training(training, in_scenario)
    if isinstance(data.get("lora"), dict):
        ignored += classify_lora(data["lora"], in_scenario)
    ds_file = data.pop("_deepspeed_file", "")
    where = f" (in {ds_file})" if ds_file else ""
    ds = data.get("deepspeed")
    ds_ignored = classify_deepspeed(ds, where) if isinstance(ds, dict) else []
    found = origins(data, data.pop("_set", []), {"model": model_file, "deepspeed": ds_file}, source)
    if isinstance(ds, dict):
        # HF compares neutral keys too (learning_rate with the optimizer's and the scheduler's lr): both sides whole
        hf_view = {item.path.removeprefix("training."): item.value for item in ignored
                   if item.path.startswith("training.")} | training
        ds_view = {item.path.removeprefix("deepspeed."): item.value for item in ds_ignored
                   if item.path.count(".") == 1} | ds
        resolve_auto(ds_view, hf_view, *(data.get(k) if isinstance(data.get(k), dict) else {}
                                         for k in ("hardware", "model")), where=where)
        ds.update({key: ds_view[key] for key in ds})
    return ignored + ds_ignored, found


def _describe(exc: ValidationError) -> str:
    """The first validation error as one line: key path, problem, value."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    loc = loc.replace("hardware.device_name", "hardware.device")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    value = err.get("input")
    if isinstance(value, dict):  # a section's own check: its message names the key and the value
        key, sep, rest = msg.partition(": ")
        if sep and key.isidentifier():
            return f"{loc}.{key}: {rest}" if loc else msg
        return f"{loc or 'scenario'}: {msg}"
    return f"{loc or 'scenario'}: {msg} (got {value!r})"


def _resolve_model(data: dict, base_dir: Path) -> None:
    """model: catalog name | path to a config.json | inline mapping → mapping, remembering the name."""
    data["model"], data["_model_name"], data["_model_file"] = read_model(data["model"], base_dir)


def _resolve_device(data: dict) -> None:
    hardware = data.get("hardware")
    if not isinstance(hardware, dict):
        raise ScenarioError(f"hardware: expected a mapping (got {hardware!r})")
    hardware["device"], hardware["_device_name"] = _device_mapping(hardware.get("device"))


def _device_mapping(ref: Any) -> tuple[dict, str]:
    if isinstance(ref, dict):
        return ref, str(ref.get("name", "inline"))
    if not isinstance(ref, str):
        raise ScenarioError(f"hardware.device: expected a catalog name or a mapping (got {ref!r})")
    return catalog.load_entry("hardware", ref, "hardware.device"), ref.lower()


def _apply_override(data: dict, override: str, base_dir: Path) -> None:
    """KEY=VALUE with VALUE parsed as a YAML scalar; a name replaces the entry, a key below it edits the entry."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ScenarioError(f"--set: expected KEY=VALUE (got {override!r})")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ScenarioError(f"--set {key}: value is not a YAML scalar: {text!r}") from None
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "training" and parts[1] in SEQ_LEN_ALIASES:
        parts[1] = "seq_len"  # an alias on the command line overrides whatever the file says
    if parts[0] not in _TOP_KEYS:
        raise ScenarioError(f"--set {key}: unknown key {parts[0]!r}")
    set_paths = data.setdefault("_set", [])
    set_paths.append("model.torch_dtype" if parts == ["model", "dtype"] else ".".join(parts))
    if parts == ["model"]:
        data["model"], data["_model_name"], data["_model_file"] = read_model(value, base_dir)
        return
    if parts == ["hardware", "device"]:
        data.setdefault("hardware", {})
        data["hardware"]["device"], data["hardware"]["_device_name"] = _device_mapping(value)
        return
    if parts == ["deepspeed"]:
        data["deepspeed"], data["_deepspeed_file"] = read_deepspeed(value, base_dir)
        return
    if (parts[0] == "model" and isinstance(data.get("model"), dict) and parts[1] not in data["model"]
            and parts[1] not in ModelSpec.model_fields and parts[1] != "dtype"):
        raise ScenarioError(f"--set {key}: unknown model key {parts[1]!r}")
    if parts in (["model", "dtype"], ["model", "torch_dtype"]) and isinstance(data.get("model"), dict):
        data["model"].pop("dtype", None)  # --set replaces the dtype under whichever spelling the file used
        parts = ["model", "torch_dtype"]
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ScenarioError(f"--set {key}: {where} is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


