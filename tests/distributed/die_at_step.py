"""``zotune train`` as one rank of a torchrun job, whose rank DIE_RANK kills itself with SIGKILL after step DIE_STEP.

    torchrun ... tests/distributed/die_at_step.py DIE_RANK DIE_STEP train --flags...

A rank dies at a fixed point of the run, whatever the machine's speed: the test of a dead rank
used to kill one from outside once the log showed 12 steps, and on a fast machine the 30-step
run could finish first.
"""

import os
import signal
import sys

from zotune.cli import entry
from zotune.train import loop

die_rank, die_step = int(sys.argv[1]), int(sys.argv[2])
step = loop.Training.step


def step_then_die(self, index: int) -> float:
    loss = step(self, index)
    if int(os.environ["RANK"]) == die_rank and index + 1 == die_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss


loop.Training.step = step_then_die
entry(sys.argv[3:])
