"""The allocator policy of the model's processes: freed large tensors are reused, not faulted in again."""

import json
import platform
import subprocess
import sys

import pytest

# In a fresh process: page faults per "step" (a few large buffers, all freed at its end), with
# glibc's default policy, then after `reuse_large_blocks`.
PROBE = """
import json, resource, torch
from workflows.runtime.allocator import reuse_large_blocks

def faults_per_step(steps=8):
    counts = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.empty(n << 20).fill_(1) for n in (12, 5, 9, 12)]  # 48, 20, 36, 48 MiB
        del buffers
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults_per_step()
changed = reuse_large_blocks()
print(json.dumps({"default": default, "changed": changed, "tuned": faults_per_step()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc policy")
def test_freed_large_tensors_are_reused_without_page_faults():
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                    check=True).stdout)
    pages = (152 << 20) // 4096  # of one step's buffers
    assert out["changed"]
    assert min(out["default"][-4:]) > pages // 2  # mapped afresh every step: faulted in again
    assert max(out["tuned"][-4:]) < pages // 100  # once the heap holds a step's peak: reused
