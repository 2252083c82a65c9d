"""pytest-benchmark suites for the attention kernels, and the tools around them (report, compare,
history, tune). The JSON-only tools import neither torch nor Triton."""
