"""Where a whole training step spends its time on one GPU: host-device syncs, host-bound gaps, top kernels.

For each (model, provider) named on the command line it builds the runner exactly as ``bench/train.py`` does, then
1. runs one step under ``torch.cuda.set_sync_debug_mode("error")`` and prints the project frames of the first
   host-device sync, if any;
2. times steps (wall, and the host's enqueue time); wall well above the profiled kernel total means the host
   cannot keep the GPU busy;
3. profiles one step and prints the top CUDA kernels and the top CPU ops by self time;
4. from the same profile, the GPU's idle time between kernels, by the kernels on either side of each gap: where in
   the step the host fell behind.

Usage (one GPU): python tools/gpu_jobs/step_diag.py moe:veofast moe:transformers+veofast dense:veofast
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, ".")
from bench.train import LLAMA_1B, build_runner, make_batch, moe_config  # noqa: E402
from veofast.distributed.parallel_state import init_parallel_state  # noqa: E402

MODELS = {"dense": LLAMA_1B, "moe": moe_config(4)}
SEQ_LEN = 8192


def _sync_stacks(runner) -> list[str]:
    """The first host-device sync of one step (sync debug mode 'error'), as the project frames of its stack."""
    stacks = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):  # each sync raises; record its stack, then let the step run without that site's check
            try:
                runner.step()
                break
            except RuntimeError as exc:
                frames = [
                    f"{f.filename.split('/work/')[-1]}:{f.lineno} {f.name}"
                    for f in traceback.extract_tb(exc.__traceback__)
                    if ("veofast" in f.filename or "bench" in f.filename or "kernels" in f.filename)
                ]
                stacks.append(" <- ".join(reversed(frames[-4:])) + f" | {str(exc)[:80]}")
                break
    finally:
        torch.cuda.set_sync_debug_mode("default")
        runner.optimizer.zero_grad(set_to_none=True)
    return stacks


def _wall_ms(runner, steps: int = 6) -> tuple[float, float]:
    """Median (wall time, host enqueue time) of one step in ms: the wall time to compare with the profiled kernel
    total, the host's time to issue the step (until ``step()`` returns, before the final sync) to see how far
    ahead of the GPU the host runs."""
    walls, hosts = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.step()
        hosts.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def _idle_gaps(events, min_us: float = 10.0, top: int = 14) -> list[str]:
    """GPU idle time between consecutive kernels (gaps >= ``min_us``), summed by the pair (kernel before the gap,
    kernel after it): the names say where in the step the host fell behind."""
    kernels = sorted((e for e in events if str(e.device_type).endswith("CUDA")), key=lambda e: e.time_range.start)
    by_pair: dict[str, list[float]] = {}
    end, before = None, ""
    for k in kernels:
        if end is not None and k.time_range.start - end >= min_us:
            by_pair.setdefault(f"{before[:50]}  ->  {k.name[:50]}", []).append(k.time_range.start - end)
        if end is None or k.time_range.end >= end:
            end, before = k.time_range.end, k.name
    total = sum(sum(v) for v in by_pair.values()) / 1e3
    lines = [f"  GPU idle in gaps >= {min_us:.0f} us: {total:.2f} ms; by (kernel before -> kernel after) (ms, gaps):"]
    for pair, gaps in sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"    {sum(gaps) / 1e3:7.2f} {len(gaps):5d}  {pair}")
    return lines


def _profile(runner, top: int = 22) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = sorted(
        (e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: -e.self_device_time_total,
    )
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    lines = [f"  kernel total {total:.1f} ms; top kernels (ms, calls):"]
    for e in kernels[:top]:
        lines.append(f"    {e.self_device_time_total / 1e3:7.2f} {e.count:5d}  {e.key[:110]}")
    cpu = sorted(
        (e for e in averages if e.device_type == torch.autograd.DeviceType.CPU), key=lambda e: -e.self_cpu_time_total
    )
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    lines.append(f"  kernel launches {launches}; top CPU ops by self time (ms, calls):")
    for e in cpu[:14]:
        lines.append(f"    {e.self_cpu_time_total / 1e3:7.2f} {e.count:5d}  {e.key[:110]}")
    lines += _idle_gaps(prof.events())
    return "\n".join(lines)


def main() -> None:
    init_parallel_state(dp_mode="fsdp2")
    device = torch.device("cuda")
    for spec in sys.argv[1:]:
        model_name, provider = spec.split(":", 1)
        hf = MODELS[model_name]
        print(f"===== {model_name} / {provider}", flush=True)
        try:
            batch = make_batch(hf["vocab_size"], SEQ_LEN, device)
            runner = build_runner(provider, hf, batch, device)
            for _ in range(3):
                runner.step()
            torch.cuda.synchronize()
            wall, host = _wall_ms(runner)
            print(f"  step wall {wall:.1f} ms, host enqueue {host:.1f} ms (medians of 6)", flush=True)
            print(_profile(runner), flush=True)
            print(
                "  first sync (last: it may leave the step half done):",
                *(_sync_stacks(runner) or ["none"]),
                sep="\n    ",
                flush=True,
            )
        except Exception:
            print(traceback.format_exc()[-2000:], flush=True)
        runner = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
