"""Software versions named by a scenario, parsed into comparable tuples."""

import re

from sim.errors import ScenarioError

# The newest versions whose behaviour the simulator knows; a scenario without `software` gets these.
NEWEST_TORCH = "2.13.0"
NEWEST_TRANSFORMERS = "5.24.0"
NEWEST_DEEPSPEED = "0.19.6"
NEWEST_PEFT = "0.21.2"

_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?([.+\-a-zA-Z0-9]*)\s*$")


def parse_version(text: str, key_path: str) -> tuple[int, int, int]:
    """'4.39.3' → (4, 39, 3); suffixes such as '.dev0' or '+cu121' are ignored."""
    match = _VERSION.match(str(text))
    if not match:
        raise ScenarioError(f"{key_path}: not a version string: {text!r}")
    major, minor, patch = (int(g) if g else 0 for g in match.groups()[:3])
    return (major, minor, patch)
