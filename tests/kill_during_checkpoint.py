"""Run train.py, but SIGKILL the process in the middle of writing its second checkpoint (test helper)."""
import os
import signal
import sys

import trainer.state as state

calls = {"n": 0}
real_save = state.atomic_save


def dying_save(write, path):
    calls["n"] += 1
    if calls["n"] < 2:
        return real_save(write, path)

    def partial(tmp):
        write(tmp)
        with open(tmp, "r+b") as f:  # half-written file, then the process dies before the rename
            f.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(partial, path)


state.atomic_save = dying_save
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

sys.exit(train.main([sys.argv[0]] + sys.argv[1:]))
