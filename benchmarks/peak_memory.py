"""Honest peak memory of one call, measured in a fresh process.

CPU: a subprocess builds the inputs, resets the kernel's peak-RSS mark
(writing 5 to /proc/self/clear_refs), runs the provider once and reports
VmHWM - VmRSS-after-inputs: the memory the call itself needed, beyond its
inputs. CUDA: torch.cuda.max_memory_allocated over the call, minus the
inputs' allocation.

    python benchmarks/peak_memory.py <module> <case-function> <provider> <json-args>

where <module>.<case-function>(provider, *args) returns (fn, inputs).
"""
import importlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_delta_mb(module, case, provider, *args, device="cpu"):
    """Runs the provider once in a fresh process; returns the peak MB beyond its inputs (or None)."""
    env = dict(os.environ)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = root + os.pathsep + HERE + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(HERE, "peak_memory.py"), module, case, provider, json.dumps(list(args)), device]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-2000:])
        return None
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def _main():
    module, case, provider, args, device = sys.argv[1:6]
    import torch

    fn, _inputs = getattr(importlib.import_module(module), case)(provider, *json.loads(args), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    print((_status_kb("VmHWM") - base) / 1024)


if __name__ == "__main__":
    _main()
