"""pytest-benchmark suites for the attention kernels, and the tools around them.

Importing `kernels` first sets up Triton's interpreter on a machine without a GPU, before any
tool here imports triton itself.
"""

import kernels  # noqa: F401
