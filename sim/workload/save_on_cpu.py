"""torch.autograd.graph.save_on_cpu around the model's forward (activation CPU offload, issue #16): its pack hook
copies every tensor an autograd node saves into a (pinned) CPU tensor of the same size, so the node keeps no device
memory; its unpack hook copies it back to a new device tensor before the node's backward, which the node drops once
its backward has run (torch/autograd/graph.py save_on_cpu, pack_to_cpu / unpack_from_cpu, unchanged in essentials
from torch 1.10 to 2.13). Every saved tensor is copied, a parameter too (Linear saves its weight for the input's
gradient): its device copy costs a weight's size during that node's backward. Each saved tensor is its own copy, two
nodes saving one storage make two. The copies cross PCIe: pack's copy_ into a pinned tensor is blocking (the host
waits for it), unpack's .to(device, non_blocking=True) is not. The pinned host buffers are not counted."""

from collections.abc import Sequence

from sim.ops import Category, OpKind, Stream
from sim.vocab import DType
from sim.workload.tape import Node, Tape, Tensor


class SaveOnCpu:
    """The saved-tensor hooks of one save_on_cpu context, on the tape while the forward runs."""

    def __init__(self) -> None:
        self.packed: dict[int, list[tuple[str, int, DType]]] = {}  # node seq -> (name, numel, dtype) per saved tensor

    def pack(self, tape: Tape, node: Node, saved: Sequence[Tensor]) -> None:
        """pack_to_cpu: the CPU copy takes the tensor's place; the node holds no device storage."""
        node.frame = self
        self.packed[node.seq] = [(tensor.storage.name, tensor.numel, tensor.dtype) for tensor in saved]
        # the copy after the node's kernel, on its stream; the node's op stays the current one (what it allocates
        # and frees is its own)
        copy = tape.side_op(f"{node.name}.pack_to_cpu", Stream.COMPUTE, kind=OpKind.DEVICE_TO_HOST,
                            bytes_moved=sum(tensor.numel * tensor.dtype.size_bytes for tensor in saved))
        tape.host_wait_for(copy)

    def unpack(self, tape: Tape, node: Node) -> None:
        """unpack_from_cpu: each saved tensor copied to a new device tensor, handed to the node."""
        tensors = self.packed.pop(node.seq)
        moved = sum(numel * dtype.size_bytes for _, numel, dtype in tensors)
        tape.op(f"{node.name}.unpack_from_cpu", bytes_moved=moved, kind=OpKind.HOST_TO_DEVICE)
        for name, numel, dtype in tensors:
            node.saved.append(tape.empty(f"{name}.from_cpu", numel, dtype, Category.ACTIVATIONS).storage)

    def unpacked(self, tape: Tape, node: Node) -> None:
        """Nothing held beyond the node's own saved tensors, which the tape has released."""
