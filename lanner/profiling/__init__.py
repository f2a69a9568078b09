"""Where inference time goes: prefill vs decode, by component, with FLOPs, bytes and a measured roofline.

`lanner profile` (cli.py) drives Profiler (profile.py), which times engine steps whole and through the
timing proxies of timing.py; flops.py counts each component's work, machine.py measures the ceilings,
and report.py writes the table, CSV/JSON and plots.
"""
