"""The optimizer step as HF Trainer runs it: gradient clipping, torch AdamW (for-loop, foreach, fused),
bitsandbytes' 8-bit AdamW or SGD, with states created lazily at the first step, then zero_grad(set_to_none=True)."""

from enum import Enum

from sim.ops import Category
from sim.vocab import BITSANDBYTES_OPTIMS, DType, Optim
from sim.workload.tape import Param, Tape, Tensor


# elements per chunk of a multi_tensor_apply kernel (aten/src/ATen/native/cuda/MultiTensorApply.cuh kChunkSize)
FOREACH_CHUNK_ELEMENTS = 65536


# bitsandbytes Optimizer2State (bitsandbytes/optim/optimizer.py): parameters of fewer elements than min_8bit_size
# keep two fp32 states; larger ones two uint8 states, each with an fp32 absmax per block of BNB_BLOCK_ELEMENTS
# (2048 up to 0.43.3, 256 from 0.44.0: bitsandbytes PR #1365), and two 256-entry fp32 quantisation maps shared by
# the optimizer ("dynamic" and "udynamic", moved to the device once)
BNB_MIN_8BIT_ELEMENTS = 4096
BNB_QMAP_ENTRIES = 256
_EMBEDDING_WEIGHTS = ("embed_tokens.weight", "embed_tokens.modules_to_save.default.weight", "wte.weight",
                      "wte.modules_to_save.default.weight")


def bnb_block_elements(bitsandbytes: tuple[int, int, int]) -> int:
    """The blocksize of bitsandbytes' blockwise 8-bit optimizer states in this version."""
    return 2048 if bitsandbytes < (0, 44, 0) else 256


def bnb_embeddings_in_fp32(transformers: tuple[int, int, int]) -> bool:
    """Whether HF's Trainer gives nn.Embedding weights 32-bit states (GlobalOptimManager.register_module_override):
    up to 4.29 (adamw_bnb_8bit was bitsandbytes' Adam8bit, the class name the Trainer checked) and from 4.52
    (transformers PR #37331 checks for bitsandbytes with optim_bits 8); 4.30-4.51 used AdamW(optim_bits=8), which the
    old check missed (PR #23217)."""
    return transformers < (4, 30, 0) or transformers >= (4, 52, 0)


class AdamImpl(Enum):
    FOR_LOOP = "for-loop"
    FOREACH = "foreach"
    FUSED = "fused"
    BNB_8BIT = "bitsandbytes-8bit"


def adam_impl(optim: Optim, on_host: bool) -> AdamImpl:
    """torch.optim.AdamW with foreach=None picks foreach for CUDA tensors and the for-loop elsewhere
    (torch/optim/optimizer.py _default_to_fused_or_foreach)."""
    if optim is Optim.ADAMW_TORCH_FUSED:
        return AdamImpl.FUSED
    if optim is Optim.ADAMW_TORCH_FOREACH:
        return AdamImpl.FOREACH
    if optim in BITSANDBYTES_OPTIMS:
        return AdamImpl.BNB_8BIT
    return AdamImpl.FOR_LOOP if on_host else AdamImpl.FOREACH


def adamw_foreach_denom_list(torch: tuple[int, int, int]) -> bool:
    """Whether _multi_tensor_adamw makes `denom` out of place: before torch 2.1 it ran
    `denom = torch._foreach_add(exp_avg_sq_sqrt, eps)`, a second full-size list alive with exp_avg_sq_sqrt until the
    function returns; pytorch/pytorch#104898 (merged 2023-07-10, first in 2.1.0; issue #97712) made it
    `torch._foreach_add_(exp_avg_sq_sqrt, eps)`."""
    return torch < (2, 1, 0)


def param_groups(params: list[Param]) -> list[list[Param]]:
    """Trainer.create_optimizer: weights with weight decay, then biases and norm weights without."""
    decay = [p for p in params if not _no_decay(p.name)]
    no_decay = [p for p in params if _no_decay(p.name)]
    return [g for g in (decay, no_decay) if g]


def _no_decay(name: str) -> bool:
    return name.endswith(".bias") or "norm" in name.rsplit(".", 2)[-2]


class Optimizer:
    """Holds the lazily created state of one rank's optimizer over its trainable parameters."""

    def __init__(self, optim: Optim, params: list[Param], on_host: bool, weight_decay: float,
                 foreach_denom_list: bool = False, bnb_block_elements: int = 256,
                 bnb_embeddings_in_fp32: bool = False) -> None:
        """`foreach_denom_list`: foreach AdamW makes `denom` as a second list (adamw_foreach_denom_list);
        `bnb_block_elements`, `bnb_embeddings_in_fp32`: bitsandbytes' blocksize and the Trainer's embedding
        override at the scenario's versions (bnb_block_elements, bnb_embeddings_in_fp32)."""
        self.optim = optim
        self.foreach_denom_list = foreach_denom_list
        self.bnb_block_elements = bnb_block_elements
        self.bnb_embeddings_in_fp32 = bnb_embeddings_in_fp32
        self.bnb_qmaps: list[Tensor] = []
        self.groups = param_groups(params)
        self.impl = adam_impl(optim, on_host)
        self.on_host = on_host
        self.weight_decay = weight_decay
        self.state: dict[str, list[Tensor]] = {}

    def clip_grad_norm(self, tp: Tape) -> None:
        """clip_grad_norm_ (torch/nn/utils/clip_grad.py): per dtype group torch._foreach_norm, whose CUDA kernel
        (aten/src/ATen/native/cuda/ForeachReduceOp.cu foreach_tensor_norm_cuda) fills an opmath (fp32)
        output_per_tensor of ntensors · ceil(max numel / 65536) chunk partials (kChunkSize, multi_tensor_apply.cuh),
        freed on return, and returns one 0-dim norm per grad in the grad's dtype; then
        vector_norm(stack(norms)) (a stacked tensor of ntensors norms, freed once reduced), clip_coef =
        max_norm / (total_norm + 1e-6) and clamp(clip_coef, max=1.0), and the grads are scaled in place by
        _foreach_mul_. Older torch returned the norms as views of one ntensors tensor (not modelled: the same
        bytes or fewer, in 512 B blocks). On a CPU host _foreach_norm is the per-tensor slow path: no scratch."""
        grads = [p.grad for group in self.groups for p in group if p.grad is not None]
        if not grads:
            return
        norms = []
        for dtype in dict.fromkeys(g.dtype for g in grads):  # _group_tensors_by_device_and_dtype, in order
            group = [g for g in grads if g.dtype is dtype]
            max_chunks = max(-(-g.numel // FOREACH_CHUNK_ELEMENTS) for g in group)
            tp.op(f"clip_grad_norm.foreach_norm.{dtype.value}", bytes_moved=sum(g.size_bytes for g in group))
            partials = None if self.on_host else \
                tp.empty("foreach_norm.output_per_tensor", len(group) * max_chunks, DType.FLOAT32)
            norms += [tp.empty("grad_norm", 1, dtype) for _ in group]
            tp.drop(partials)
        norm_dtype = norms[0].dtype if len({n.dtype for n in norms}) == 1 else DType.FLOAT32
        tp.op("clip_grad_norm.stack_norm", bytes_moved=sum(n.size_bytes for n in norms))
        stacked = tp.empty("grad_norm_stack", len(norms), norm_dtype)
        tp.op("clip_grad_norm.vector_norm", bytes_moved=stacked.size_bytes)
        total = tp.empty("total_norm", 1, norm_dtype)
        tp.drop(stacked, *norms)  # norms is a local of _get_total_norm (earlier torch: of clip_grad_norm_ itself)
        tp.op("clip_grad_norm.clip_coef")
        shifted = tp.empty("total_norm_plus_eps", 1, norm_dtype)
        coef = tp.empty("clip_coef", 1, norm_dtype)
        tp.drop(shifted)
        clamped = tp.empty("clip_coef_clamped", 1, norm_dtype)
        tp.op("clip_grad_norm.foreach_mul_", bytes_moved=2 * sum(g.size_bytes for g in grads))
        tp.drop(total, coef, clamped)

    def step(self, tp: Tape) -> None:
        for index, group in enumerate(self.groups):
            live = [p for p in group if p.grad is not None]
            if self.optim is Optim.SGD:
                self._sgd(tp, index, live)
            elif self.impl is AdamImpl.BNB_8BIT:
                self._bnb_adamw(tp, index, live)
            else:
                self._adamw(tp, index, live)

    def _bnb_adamw(self, tp: Tape, index: int, params: list[Param]) -> None:
        """bitsandbytes AdamW(optim_bits=8), Optimizer8bit.step: per parameter, init_state at its first step, then
        one fused update kernel (optimizer_update_8bit_blockwise, or optimizer_update_32bit for a 32-bit one) that
        reads param, grad and both states and writes param and states, with no temporaries."""
        for p in params:
            numel, size = p.tensor.numel, p.tensor.dtype.size_bytes
            state = self.state.get(p.name)
            if state is None:
                state = self._bnb_init_state(tp, index, p)
            eight_bit = state[0].dtype is DType.UINT8
            state_bytes = 1 if eight_bit else 4
            tp.op(f"{p.name}.bnb_adamw.update_{8 if eight_bit else 32}bit", flops=12.0 * numel,
                  bytes_moved=numel * (3 * size + 4 * state_bytes))

    def _bnb_init_state(self, tp: Tape, index: int, p: Param) -> list[Tensor]:
        """Optimizer2State.init_state: fp32 zeros of the parameter's shape for state1 and state2 below
        BNB_MIN_8BIT_ELEMENTS or for an embedding weight the Trainer overrides to 32 bits; otherwise uint8 states and
        an fp32 absmax per block each, and (at the first such parameter) the two quantisation maps on the device."""
        numel = p.tensor.numel
        tp.op(f"optimizer.group{index}.{p.name}.init_state")
        fp32 = numel < BNB_MIN_8BIT_ELEMENTS or (self.bnb_embeddings_in_fp32 and p.name.endswith(_EMBEDDING_WEIGHTS))
        if fp32:
            state = [tp.persistent_buffer(f"{p.name}.{name}", numel, DType.FLOAT32, Category.OPTIMIZER_STATES)
                     for name in ("state1", "state2")]
        else:
            if not self.bnb_qmaps:
                self.bnb_qmaps = [tp.persistent_buffer(f"bnb.qmap.{name}", BNB_QMAP_ENTRIES, DType.FLOAT32,
                                                       Category.OPTIMIZER_STATES) for name in ("dynamic", "udynamic")]
                tp.allocate_existing(*self.bnb_qmaps)
            blocks = -(-numel // self.bnb_block_elements)
            state = [tp.persistent_buffer(f"{p.name}.{name}", numel, DType.UINT8, Category.OPTIMIZER_STATES)
                     for name in ("state1", "state2")]
            state += [tp.persistent_buffer(f"{p.name}.{name}", blocks, DType.FLOAT32, Category.OPTIMIZER_STATES)
                      for name in ("absmax1", "absmax2")]
        tp.allocate_existing(*state)
        self.state[p.name] = state
        return state

    def _init_state(self, tp: Tape, index: int, params: list[Param]) -> None:
        """_init_group: exp_avg and exp_avg_sq = zeros_like(param); the step count is a host scalar unless fused."""
        fresh = [p for p in params if p.name not in self.state]
        if not fresh:
            return
        tp.op(f"optimizer.group{index}.init_state", bytes_moved=2 * sum(p.tensor.size_bytes for p in fresh))
        for p in fresh:
            numel, dtype = p.tensor.numel, p.tensor.dtype
            state = [tp.persistent_buffer(f"{p.name}.exp_avg", numel, dtype, Category.OPTIMIZER_STATES),
                     tp.persistent_buffer(f"{p.name}.exp_avg_sq", numel, dtype, Category.OPTIMIZER_STATES)]
            if self.impl is AdamImpl.FUSED:  # fused keeps `step` as an fp32 device scalar per param
                state.append(tp.persistent_buffer(f"{p.name}.step", 1, DType.FLOAT32, Category.OPTIMIZER_STATES))
            tp.allocate_existing(*state)
            self.state[p.name] = state

    def _adamw(self, tp: Tape, index: int, params: list[Param]) -> None:
        self._init_state(tp, index, params)
        # Bytes are in units of the params' size: e.g. the fused kernel reads param, grad, exp_avg, exp_avg_sq and
        # writes param, exp_avg, exp_avg_sq (7 passes); FLOPs per element: ~12 for a whole Adam update.
        total = sum(p.tensor.size_bytes for p in params)
        elements = sum(p.tensor.numel for p in params)
        name = f"optimizer.group{index}.adamw"
        if self.impl is AdamImpl.FUSED:  # torch._fused_adamw_: one kernel, no temporaries
            tp.op(f"{name}.fused", flops=12.0 * elements, bytes_moved=7 * total)
        elif self.impl is AdamImpl.FOREACH:
            # _multi_tensor_adamw: in-place lerp/mul/addcmul, then exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)
            # (new tensors for the whole group), in-place div/add, addcdiv into the params. Before torch 2.1 the
            # add was out of place: denom = _foreach_add(exp_avg_sq_sqrt, eps), a second list; both are locals
            # alive at addcdiv_ and freed when the function returns (adamw_foreach_denom_list).
            tp.op(f"{name}.foreach_update_moments", flops=5.0 * elements, bytes_moved=5 * total)
            tp.op(f"{name}.foreach_sqrt", bytes_moved=2 * total)
            roots = [tp.empty(f"{p.name}.exp_avg_sq_sqrt", p.tensor.numel, p.tensor.dtype) for p in params]
            if self.foreach_denom_list:
                tp.op(f"{name}.foreach_add", bytes_moved=2 * total)
                roots += [tp.empty(f"{p.name}.denom", p.tensor.numel, p.tensor.dtype) for p in params]
            tp.op(f"{name}.foreach_addcdiv_", flops=4.0 * elements, bytes_moved=4 * total)
            tp.drop(*roots)
        else:
            # _single_tensor_adamw, per param: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps).
            # `denom` is a loop variable: param i's is released when param i+1's div rebinds it, the last one
            # when the function returns.
            previous = None
            for p in params:
                size = p.tensor.size_bytes
                tp.op(f"{p.name}.adamw.update_moments", flops=5.0 * p.tensor.numel, bytes_moved=5 * size)
                tp.op(f"{p.name}.adamw.sqrt", bytes_moved=2 * size)
                root = tp.empty(f"{p.name}.exp_avg_sq.sqrt", p.tensor.numel, p.tensor.dtype)
                tp.op(f"{p.name}.adamw.div", bytes_moved=2 * size)
                denom = tp.empty(f"{p.name}.denom", p.tensor.numel, p.tensor.dtype)
                tp.drop(root, previous)
                tp.op(f"{p.name}.adamw.addcdiv_", flops=4.0 * p.tensor.numel, bytes_moved=4 * size)
                previous = denom
            tp.op(f"{name}.return")
            tp.drop(previous)

    def _sgd(self, tp: Tape, index: int, params: list[Param]) -> None:
        """torch.optim.SGD with momentum 0 keeps no state; with weight decay the foreach path builds
        grads + wd·params as new tensors (_multi_tensor_sgd)."""
        total = sum(p.tensor.size_bytes for p in params)
        name = f"optimizer.group{index}.sgd"
        if self.weight_decay and index == 0:
            tp.op(f"{name}.weight_decay", bytes_moved=3 * total)
            decayed = [tp.empty(f"{p.name}.grad_wd", p.tensor.numel, p.tensor.dtype) for p in params]
            tp.op(f"{name}.foreach_add_", bytes_moved=3 * total)
            tp.drop(*decayed)
        else:
            tp.op(f"{name}.foreach_add_", bytes_moved=3 * total)

    def state_bytes(self) -> int:
        return sum(t.size_bytes for tensors in (*self.state.values(), self.bnb_qmaps) for t in tensors)


def zero_grad(tp: Tape, params: list[Param]) -> None:
    """model.zero_grad(): set_to_none=True releases every .grad."""
    tp.op("zero_grad")
    for p in params:
        if p.grad is not None:
            tp.drop(p.grad)
            p.grad = None
