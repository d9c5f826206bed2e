"""`vlmtune train` in a process that kills itself (SIGKILL) at a chosen stage of a checkpoint write.

    CKPT_TEST_KILL=optimizer:4 python tests/checkpoint_worker.py --model TINY --data DATA --out OUT --save-steps 2 ...

Used by ``tests/test_checkpoints.py``. The arguments are those of ``vlmtune train``. ``CKPT_TEST_KILL`` (read only
by this script) is ``<stage>:<step>``, the stage of writing ``checkpoint-<step>``:

    folder     its staging folder exists, nothing is written in it yet
    adapter    the adapter files are written, nothing else
    optimizer  half of optimizer.pt is on disk
    rename     every file and the marker are written; the folder is not renamed into place yet
    enospc     not a kill: the rename fails with ENOSPC, as on a full disk
    step       not a checkpoint stage: killed as optimiser step <step> begins

Without it the run goes to the end. Each training step prints ``worker: step N`` to stderr as it begins, so a test
can tell a resumed run from one that started over.
"""

import errno
import io
import os
import signal
import sys
from pathlib import Path

import torch

from vlmtune.checkpoints import CheckpointTrainer
from vlmtune.cli import main


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(stage: str, step: int) -> None:
    save_model = CheckpointTrainer.save_model
    training_step = CheckpointTrainer.training_step
    save = torch.save
    replace = os.replace

    def save_model_then_die(self, *args, **kwargs):
        if self.state.global_step == step and stage == "folder":
            _die()
        save_model(self, *args, **kwargs)
        if self.state.global_step == step and stage == "adapter":
            _die()

    def save_half_then_die(obj, f, *args, **kwargs):
        if stage == "optimizer" and Path(str(f)).name == "optimizer.pt" and f"checkpoint-{step}" in str(f):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: buffer.tell() // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _die()
        return save(obj, f, *args, **kwargs)

    def replace_or_die(src, dst, *args, **kwargs):
        if Path(dst).name == f"checkpoint-{step}":
            if stage == "rename":
                _die()
            if stage == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst, *args, **kwargs)

    def training_step_or_die(self, *args, **kwargs):
        if stage == "step" and self.state.global_step == step - 1:
            _die()
        return training_step(self, *args, **kwargs)

    CheckpointTrainer.save_model = save_model_then_die
    CheckpointTrainer.training_step = training_step_or_die
    torch.save = save_half_then_die
    os.replace = replace_or_die


def _announce_steps() -> None:
    training_step = CheckpointTrainer.training_step

    def announced(self, *args, **kwargs):
        print(f"worker: step {self.state.global_step + 1}", file=sys.stderr, flush=True)
        return training_step(self, *args, **kwargs)

    CheckpointTrainer.training_step = announced


if __name__ == "__main__":
    _announce_steps()
    if "CKPT_TEST_KILL" in os.environ:
        stage, step = os.environ["CKPT_TEST_KILL"].split(":")
        _arm(stage, int(step))
    sys.exit(main(["train", *sys.argv[1:]]))
