"""Software versions named by a scenario, parsed into comparable tuples."""

import re

from sim.errors import ScenarioError

# The newest versions whose behaviour the simulator knows; a scenario without `software` gets these.
NEWEST_TORCH = "2.13.0"
NEWEST_TRANSFORMERS = "5.24.0"
NEWEST_DEEPSPEED = "0.19.6"
NEWEST_PEFT = "0.21.2"
NEWEST_BITSANDBYTES = "0.50.2"

# The release series known, each with its last release up to the NEWEST_* above: PyPI's release history
# (`pip index versions <package>`, read 2026-12-07; transformers from 4.0, torch from 1.13 as the index lists it).
_RELEASES = {
    "transformers": "4.0.1 4.1.1 4.2.2 4.3.3 4.4.2 4.5.1 4.6.1 4.7.0 4.8.2 4.9.2 4.10.3 4.11.3 4.12.5 4.13.0 4.14.1 "
                    "4.15.0 4.16.2 4.17.0 4.18.0 4.19.4 4.20.1 4.21.3 4.22.2 4.23.1 4.24.0 4.25.1 4.26.1 4.27.4 4.28.1 "
                    "4.29.2 4.30.2 4.31.0 4.32.1 4.33.3 4.34.1 4.35.2 4.36.2 4.37.2 4.38.2 4.39.3 4.40.2 4.41.2 4.42.4 "
                    "4.43.4 4.44.2 4.45.2 4.46.3 4.47.1 4.48.3 4.49.0 4.50.3 4.51.3 4.52.4 4.53.3 4.54.1 4.55.4 4.56.2 "
                    "4.57.6 5.0.0 5.1.0 5.2.0 5.3.0 5.4.0 5.5.4 5.6.2 5.7.0 5.8.1 5.9.0 5.10.4 5.11.0 5.12.1 5.13.1 "
                    "5.14.1 5.15.1 5.16.1 5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 5.23.0 5.24.0",
    "torch": "1.13.1 2.0.1 2.1.2 2.2.2 2.3.1 2.4.1 2.5.1 2.6.0 2.7.1 2.8.0 2.9.1 2.10.0 2.11.0 2.12.1 2.13.0",
    "deepspeed": "0.3.16 0.4.5 0.5.10 0.6.7 0.7.7 0.8.3 0.9.5 0.10.3 0.11.2 0.12.6 0.13.5 0.14.5 0.15.4 0.16.9 "
                 "0.17.6 0.18.9 0.19.6",
    "peft": "0.1.0 0.2.0 0.3.0 0.4.0 0.5.0 0.6.2 0.7.1 0.8.2 0.9.0 0.10.0 0.11.1 0.12.0 0.13.2 0.14.0 0.15.2 0.16.0 "
            "0.17.1 0.18.1 0.19.1 0.20.0 0.21.2",
    # from 0.41, the first with the paged optimizers transformers' bitsandbytes names need (read 2026-12-08)
    "bitsandbytes": "0.41.3 0.42.0 0.43.3 0.44.1 0.45.5 0.46.1 0.47.0 0.48.2 0.49.2 0.50.2",
}

_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?([.+\-a-zA-Z0-9]*)\s*$")


def parse_version(text: str, key_path: str) -> tuple[int, int, int]:
    """'4.39.3' → (4, 39, 3); suffixes such as '.dev0' or '+cu121' are ignored."""
    match = _VERSION.match(str(text))
    if not match:
        raise ScenarioError(f"{key_path}: not a version string: {text!r}")
    major, minor, patch = (int(g) if g else 0 for g in match.groups()[:3])
    return (major, minor, patch)


def known_release(package: str, text: str, key_path: str) -> tuple[int, int, int]:
    """The version of `package` parsed; one that is no release the simulator knows (a series that does not exist,
    a patch after its series' last, anything after the newest known) is refused naming the known range."""
    version = parse_version(text, key_path)
    last_patch = {}
    for release in _RELEASES[package].split():
        major, minor, patch = (int(part) for part in release.split("."))
        last_patch[(major, minor)] = patch
    series = sorted(last_patch)
    oldest = f"{series[0][0]}.{series[0][1]}.0"
    newest = ".".join(str(part) for part in (*series[-1], last_patch[series[-1]]))
    known = f"(known: {oldest} - {newest})"
    if version < (*series[0], 0):
        raise ScenarioError(f"{key_path}: {text!r} is older than the oldest {package} the simulator knows {known}")
    if version > (*series[-1], last_patch[series[-1]]):
        raise ScenarioError(f"{key_path}: {text!r} is later than the newest {package} the simulator knows {known}")
    if last_patch.get(version[:2], -1) < version[2]:
        raise ScenarioError(f"{key_path}: {text!r} is no {package} release {known}")
    return version


def nearest_release(package: str, text: str) -> str:
    """The newest release of `package` the simulator knows that is not later than `text` (the oldest known where
    `text` is older than all): what a measured machine's newer version is simulated as (sim/calibrate_cuda.py)."""
    version = parse_version(text, package)
    releases = sorted(tuple(int(part) for part in release.split(".")) for release in _RELEASES[package].split())
    not_later = [release for release in releases if release[:2] < version[:2]]
    same_series = [release for release in releases if release[:2] == version[:2]]
    if same_series:
        not_later.append((*version[:2], min(version[2], same_series[0][2])))
    return ".".join(str(part) for part in (not_later[-1] if not_later else releases[0]))
