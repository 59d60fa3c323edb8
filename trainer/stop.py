"""Stopping a training run cleanly on a signal, with a checkpoint at the step it stopped at.

SIGTERM and SIGUSR1 (a scheduler's preemption or time-limit warning: SLURM's ``scancel`` or ``--signal=USR1@120``,
Kubernetes' pod termination; torchrun forwards the SIGTERM it gets to its workers) and a first Ctrl-C (SIGINT) ask
the loop to finish the optimizer step in progress, write a checkpoint and end with exit code 128 + the signal
number; re-running the same command resumes from that checkpoint as from any other (bit for bit). A second
Ctrl-C interrupts at once. Ranks that did not get the signal learn of it at the next step (``trainer.loop``), so
all ranks stop at the same step.

Without this a SIGTERM ends the process immediately and the run loses the steps since its last periodic
checkpoint (up to ``loop.ckpt_every``). Note that torchrun kills its workers 30 s after forwarding a signal,
and schedulers after their grace period: a checkpoint that takes longer to write is lost there, the previous
one is kept (checkpoints are written atomically).
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, name))


class TrainingStopped(Exception):
    """Raised by ``trainer.loop.train`` after the checkpoint a stop signal asked for has been written."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}. "
                         "Run the same command again to resume from it.")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for "ended by this signal"


class StopRequest:
    """Context manager: while active, the stop signals set ``signum`` (the first one received) instead of ending the
    process; the previous handlers come back on exit. Signals set to be ignored stay ignored, and outside the main
    thread (where Python cannot install signal handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT of a shell's background job stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the step
        self.signum = self.signum or signum
