"""Speed and memory benchmarks of loratune against PEFT, and a quality-parity check.

Run `python -m benchmarks --help`. Each (library, precision) configuration runs in a fresh subprocess
(`benchmarks.worker`), so its peak RSS is its own; `benchmarks.runner` alternates them and takes medians,
`benchmarks.report` writes JSON, markdown, a plot and the results section of docs/benchmarks.md.
"""
