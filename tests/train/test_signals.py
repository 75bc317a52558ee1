import os
import signal

import torch

from scalelm.train.signals import StopSignals


def test_sigusr1_asks_for_a_save_and_sigterm_for_a_save_and_a_stop():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(torch.device("cpu")) as signals:
        assert signals.poll() == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.poll() == (True, False)
        assert signals.poll() == (False, False)  # answered once
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.poll() == (True, True)
    assert signal.getsignal(signal.SIGTERM) is before
