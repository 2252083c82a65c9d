"""pytest-benchmark suites for the attention kernels."""
