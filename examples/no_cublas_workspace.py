"""An example user strategy: what if cuBLAS kept no workspace (CUBLAS_WORKSPACE_CONFIG=:0:0, which cuBLAS reads
to size its per-handle workspace; PyTorch's getChosenWorkspaceSize parses the same variable). A pure transform of
the expanded schedule: the workspace buffers are never allocated nor freed. Use it as

    strategies: [{kind: "examples.no_cublas_workspace:NoCublasWorkspace"}]

from the project root (the module must be importable)."""

from sim.ops import Schedule


class NoCublasWorkspace:
    """Drops every buffer whose name starts with `prefix` (default: the cuBLAS and cuBLASLt workspaces)."""

    def __init__(self, prefix: str = "cublas") -> None:
        self.prefix = prefix

    def transform(self, schedule: Schedule) -> Schedule:
        """A new expanded schedule without those buffers' allocations and frees."""
        dropped = {b.buffer_id for b in schedule.buffers if b.name.startswith(self.prefix)}
        ops = [op.with_buffers([b for b in op.allocs if b not in dropped], [b for b in op.frees if b not in dropped])
               for op in schedule.ops]
        return Schedule(schedule.buffers, [b for b in schedule.persistent if b not in dropped], ops,
                        list(schedule.op_step), list(schedule.op_micro_batch))
