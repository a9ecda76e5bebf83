"""What tests/test_warm.py checks a forked command has: it prints its argv, directory, environment, stdin, session,
random draws, rank and whether it was forked warm as JSON, then exits with argv[1] after a non-daemon thread and an
atexit handler have printed (with argv[1] `rank`, 3 x its torchrun rank)."""

import atexit
import json
import os
import random
import sys
import threading
import time

import numpy as np

if __name__ == "__main__":
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("GENRECAL_PROBE"),
                      "stdin": sys.stdin.read(), "own_session": os.getsid(0) == os.getpid(),
                      "random": random.random(), "numpy": float(np.random.rand()), "rank": os.environ.get("RANK"),
                      "warm": "tests.warm" in sys.orig_argv}), flush=True)
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined", flush=True))).start()
    if sys.argv[1] == "raise":
        raise RuntimeError("probe failed")
    sys.exit(3 * int(os.environ["RANK"]) if sys.argv[1] == "rank" else int(sys.argv[1]))  # "rank": 0, 3, 6...
