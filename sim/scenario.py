"""The scenario schema (design.md §3): loading, `--set` overrides, catalog references.

Raw YAML → references resolved (devices here; config.json, DeepSpeed JSON and trainer names by the readers in
sim/ingest/) → overrides → pydantic validation → a frozen `Scenario`. Every user error becomes a `ScenarioError`
naming the key path and the value. Settings derived from it are decided once, later, by sim/resolve.py.
"""

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from sim import catalog
from sim.errors import ScenarioError
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


Count = Annotated[int, BeforeValidator(_whole_number)]
PositiveCount = Annotated[int, BeforeValidator(_whole_number), Field(gt=0)]


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
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
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


Fraction = Annotated[float, Field(gt=0, le=1)]


class DeviceEfficiency(Frozen):
    """Achievable fractions of the datasheet peaks, as measured (hardware/*.yaml cites each); 1.0 everywhere is
    the bare roofline. gemm: large bf16/fp16 matmuls; attention: fused (flash) attention kernels; hbm: streaming
    kernels; nvlink: NCCL bus bandwidth inside a node over the per-direction NVLink figure; network: the same
    across nodes over the per-GPU NIC figure."""

    gemm: Fraction = 1.0
    attention: Fraction = 1.0
    hbm: Fraction = 1.0
    nvlink: Fraction = 1.0
    network: Fraction = 1.0


class DeviceSpec(Frozen):
    """A device as hardware/*.yaml describes it. `cuda_context_bytes` overrides the CUDA context that sim/runtime.py
    models from the versions (absent: modelled); `cuda_context_bytes: 0` with the exact allocator is a plain host."""

    name: str
    description: str = ""
    capacity_bytes: PositiveCount
    compute_capability: str = ""
    cuda_context_bytes: Annotated[int, BeforeValidator(_whole_number), Field(ge=0)] | None = None
    # NVLink SHARP (NVSwitch multicast): NCCL builds its NVLS buffers only where the device reports
    # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED (NVIDIA/nccl src/transport/nvls.cc), i.e. Hopper behind NVSwitch (HGX);
    # false for PCIe and NVLink-bridge parts
    nvlink_sharp: bool = True
    peak_flops: dict[Literal["bf16", "fp16", "tf32", "fp32"], Annotated[float, Field(gt=0)]]
    hbm_bytes_per_s: Annotated[float, Field(gt=0)]
    intra_node_bytes_per_s: Annotated[float, Field(gt=0)] = 1e11
    inter_node_bytes_per_s: Annotated[float, Field(gt=0)] = 1e10
    intra_node_latency_us: Annotated[float, Field(ge=0)] = 0.0
    inter_node_latency_us: Annotated[float, Field(ge=0)] = 0.0
    efficiency: DeviceEfficiency = DeviceEfficiency()


class Hardware(Frozen):
    device: DeviceSpec
    device_name: str
    gpus_per_node: PositiveCount = 1
    nodes: PositiveCount = 1

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


class Software(Frozen):
    torch: str = NEWEST_TORCH
    transformers: str = NEWEST_TRANSFORMERS
    deepspeed: str = NEWEST_DEEPSPEED
    peft: str = NEWEST_PEFT
    qwen_remote_code: QwenRemoteCode = QwenRemoteCode.FINAL  # model_type qwen only

    @model_validator(mode="after")
    def _known_releases(self) -> "Software":
        """Each version a release the simulator knows (sim/versions.py), never silently another."""
        for package in ("torch", "transformers", "deepspeed", "peft"):
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
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)

    @model_validator(mode="after")
    def _one_precision(self) -> "Training":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        return self


class Lora(Frozen):
    """PEFT LoraConfig names."""

    r: PositiveCount = 8
    lora_alpha: float = 8
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
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
    stage3_model_persistence_threshold: Count = 2**63 - 1
    stage3_max_live_parameters: Count = 1_000_000_000
    stage3_max_reuse_distance: Count = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    offload_param: dict[str, Any] | None = None
    offload_optimizer: dict[str, Any] | None = None


class DeepSpeed(BaseModel):
    """A DeepSpeed JSON after HF Trainer's "auto" resolution; keys other than zero_optimization are kept as-is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    zero_optimization: ZeroOptimization = ZeroOptimization()


class Allocator(Frozen):
    backend: AllocatorBackend | None = None  # None: caching on a GPU, exact on a plain host
    conf: str = ""


class Nccl(Frozen):
    """NCCL's own GPU memory (outside PyTorch's statistics, sim/parallel/nccl.py); None = NCCL's default."""

    version: str | None = None  # default: the NCCL that the named torch's PyPI wheel pins
    channels: PositiveCount | None = None  # NCCL_MIN/MAX_NCHANNELS; default 24 (8-GPU NVSwitch nodes)
    buffsize_bytes: PositiveCount = 4194304  # NCCL_BUFFSIZE (src/include/device.h DEFAULT_BUFFSIZE 1 << 22)
    nvls: bool | None = None  # NCCL_NVLS_ENABLE; default: on where NVLink SHARP exists (sm90, > 2 GPUs in a node)
    communicators: Annotated[int, BeforeValidator(_whole_number), Field(ge=0)] | None = None  # default: as created


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
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return f"{loc or 'scenario'}: {msg} (got {shown})"


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


