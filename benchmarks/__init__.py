"""Side-by-side benchmarks: timetracer-otel against the tools users would pick instead.

    python -m benchmarks                      # every scenario, table + results/latest.json
    python -m benchmarks --scenario http -r 7 # one scenario, 7 runs

See benchmarks/README.md for the scenarios, the targets and how to reproduce the table.
"""
