"""`python -m sim` runs the command line.

A run builds about a million small objects. In this one-shot process the cyclic garbage collector would scan them
after the run and again at interpreter teardown (a third of a second on the headline scenario, measured in
bench/), and nothing needs to be finalised at exit once the output is flushed: so the collector stays off and the
process ends with os._exit. Library callers (tests, bench) keep the collector (sim/simulate.py pauses it per run).
"""

import gc
import os
import sys

gc.disable()

try:
    from sim.cli import console
except KeyboardInterrupt:  # Ctrl-C while the command line loads, before it can take it (sim.cli.console)
    print("interrupted", file=sys.stderr)
    os._exit(130)

code = console()
sys.stderr.flush()
os._exit(code)
