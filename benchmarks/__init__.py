"""Speed and memory benchmarks for pixart_core against diffusers and ComfyUI (issue #5).

Not tests: they print and write tables and never assert on timings. Entry point:
`python -m benchmarks.run --quick` (see benchmarks/README.md).
"""
