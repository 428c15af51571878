"""Data-parallel placement of one rank's state and work: DDP, DeepSpeed ZeRO-1/2/3 (the other ranks are
symmetric, so one rank is simulated)."""
