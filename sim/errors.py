"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class ScenarioError(Exception):
    """A user error in a scenario or a referenced file; the message names the key path and the value."""


# The largest tensor, and the most the simulated device's addresses and the engine's int64 byte counts hold (the
# caching allocator's C core and the traces count bytes in int64: 2^63 - 1). No device comes near: the largest GPU
# memories are below 2^38 bytes (256 GiB), and x86-64 GPU virtual addresses span 2^49.
MAX_TENSOR_BYTES = 1 << 62


class TensorTooLarge(ScenarioError):
    """A tensor the scenario's shapes make larger than MAX_TENSOR_BYTES: no device can address it, so the question
    'how far off am I' has no byte answer; the message names the tensor."""


# The simulated clock counts whole µs in int64 (sim/timeline.py, sim/event_order.py): 2^62 µs is 146,000 years,
# beyond any training run, and a sum of two such times still fits.
MAX_CLOCK_US = 1 << 62


class ClockOverflow(ScenarioError):
    """Ops whose modelled durations pass MAX_CLOCK_US: the step would run for longer than the clock counts, so no
    timeline exists; the message names the keys that sized the ops."""


class WorkTooLarge(ScenarioError):
    """A run whose simulation would pass the event budget (sim/simulate.py MAX_EVENTS): refused before the work,
    its message completed with the scenario keys that drive the count."""
