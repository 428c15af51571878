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

from sim.cli import main  # noqa: E402

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
    code = 0
sys.stderr.flush()
os._exit(code)
