"""Run train.py, but rank ``STAR_SIGNAL_RANK`` sends itself ``STAR_SIGNAL`` (a signal name) right after optimizer
step ``STAR_SIGNAL_STEP`` (test helper: a signal that reaches one rank of a DDP run only)."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from trainer.star_stage import StarStage  # noqa: E402

real_after_step = StarStage.after_step


def signalling_after_step(self, step, metrics):
    real_after_step(self, step, metrics)
    if step == int(os.environ["STAR_SIGNAL_STEP"]) and os.environ.get("RANK", "0") == os.environ["STAR_SIGNAL_RANK"]:
        os.kill(os.getpid(), getattr(signal, os.environ["STAR_SIGNAL"]))


StarStage.after_step = signalling_after_step
sys.exit(train.main([sys.argv[0]] + sys.argv[1:]))
