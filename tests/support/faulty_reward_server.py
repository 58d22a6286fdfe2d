"""`orz reward-server` with the grading modules not loaded before the seal: the fault the server had before
`preload_grading_modules`, kept as a fault to inject. Its sealed workers cannot import what sympy loads on
first use, so some correct answers cannot be decided; the server must answer `error` for them, never `wrong`.

    python tests/support/faulty_reward_server.py --port P   (any `orz reward-server` option)
"""

from __future__ import annotations

import sys

import reward_server.grading
from services.cli import app

reward_server.grading.preload_grading_modules = lambda: (0, 0.0)

if __name__ == "__main__":
    sys.argv = ["orz", "reward-server", *sys.argv[1:]]
    app()
