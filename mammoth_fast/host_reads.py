"""When the input checks may read tensor values on the host.

Checks such as "no bag is empty" read a device tensor back (a sync). That is
not possible while torch.compile traces (it would break the graph) or while a
CUDA graph is being captured (the copy is an error during capture), so those
checks are skipped there; eager runs keep them.
"""
import torch
from torch import Tensor


def host_reads_allowed(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host now."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())
