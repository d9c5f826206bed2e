"""What importing vlmtune sets up: the CUDA allocator's expandable segments, unless the user chose a setting."""

import os
import subprocess
import sys

import pytest

SHOW = "import os, vlmtune; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"


def _allocator_setting(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", SHOW], env=clean | env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_import_turns_on_expandable_segments():
    assert _allocator_setting() == "expandable_segments:True"


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_setting_of_the_users_own_is_left_alone(name):
    shown = _allocator_setting(**{name: "max_split_size_mb:128"})
    assert shown == ("max_split_size_mb:128" if name == "PYTORCH_CUDA_ALLOC_CONF" else "None")
