"""The copy-engine all-to-all (veofast/distributed/copy_engine_a2a.py) against NCCL's, on the GPUs of one node, bf16.

Sections, in this order (NCCL first, so that a failing symmetric-memory path cannot lose the NCCL numbers):

1. ``compute``: the workloads alone: a bf16 GEMM chain (8192x4096 @ 4096x14336, repeated to ~10 ms) and causal
   ``scaled_dot_product_attention`` on (1, 32, 16384, 128) (repeated to ~10 ms; skipped if it fails).
2. ``alone`` (NCCL): one ``dist.all_to_all_single`` of 8, 32, 64, 128 MiB per rank (the send tensor's size).
3. ``overlap`` (NCCL): N all-to-alls of 32 MiB alone (back to back), each workload alone, and both at once (the
   all-to-alls launched before the workload, as Ulysses does). N is chosen so that the all-to-alls take about
   half the GEMM chain's time with NCCL, and is the same for every backend.
   ``hidden% = (compute + a2a_alone - concurrent) / a2a_alone``.
4. ``ce_*``: the copy-engine all-to-all: construction, exact equality with NCCL (odd row counts, several calls in
   flight, 16 in flight beside GEMMs, the stream order checked by a producer queued behind a long sleep,
   ``copy_out=False``), then sections 2 and 3 for ``ce`` (the default, copy out to a fresh tensor) and
   ``ce_view`` (``copy_out=False``): ``ce - ce_view`` is the cost of the copy out. Last, a profile of three
   calls: which CUDA kernels and memcpys run (only tiny barrier kernels should be kernels).

Timing: CUDA events; before each trial the ranks are synchronised (``cuda.synchronize`` + ``dist.barrier``) and a
sleep kernel is queued, long enough that the host queues the whole trial meanwhile (host launch time is reported
separately as ``host_ms``); median over the trials, then the maximum over ranks. Rank 0 prints tables and appends
JSON lines to ``$OUT/ce_a2a.jsonl`` (default /tmp); any rank appends a line for an error it caught.

    OUT=/tmp/ce timeout 170 torchrun --nproc_per_node=2 tools/gpu_jobs/ce_a2a.py    # or --nproc_per_node=4
"""

import os

# never NVLink multicast (NVLS): the GPU host has it disabled
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NCCL_NVLS_ENABLE"] = "0"

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import environment, print_table, record  # noqa: E402
from veofast.distributed.copy_engine_a2a import CopyEngineAllToAll  # noqa: E402

MiB = 2**20
COLS = 4096  # bf16 elements per row of the timed all-to-alls
SIZES_MIB = (8, 32, 64, 128)
OVERLAP_MIB = 32
INNER = 5  # all-to-alls per timed trial in "alone" (amortises the ranks' start skew)
CHECK_SHAPES = ((1, 8), (97, 128), (1025, 640), (4099, 1536))  # (rows, cols) per block
TARGET_COMPUTE_MS = 10.0
SLEEP_CYCLES_PER_MS = 2_000_000  # about an H200's SM clock; only sizes the queue-ahead sleep
DTYPE = torch.bfloat16

RANK = WORLD = 0
OUT = Path(os.environ.get("OUT") or "/tmp")
ERRORS: list[str] = []  # guarded sections that failed on some rank


def log(msg: str) -> None:
    if RANK == 0:
        print(msg, flush=True)


def emit(row: dict) -> None:
    if RANK == 0:
        record("ce_a2a", {"world": WORLD, **row}, results_dir=OUT)


def sync_all() -> None:
    torch.cuda.synchronize()
    dist.barrier()


def rank_max(value: float) -> float:
    t = torch.tensor([value], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def agree(ok: bool) -> bool:
    """True when every rank passes ``ok=True``."""
    return rank_max(0.0 if ok else 1.0) == 0.0


def guarded(name: str, fn: Callable[[], object]) -> tuple[bool, object]:
    """Run ``fn`` and catch what it raises: print it, record it, and let every rank know whether all succeeded."""
    try:
        result, error = fn(), None
    except Exception as e:  # reported, not swallowed
        result, error = None, f"{type(e).__name__}: {e}"
        print(f"[rank {RANK}] {name} failed: {error}\n{traceback.format_exc()}", flush=True)
        record("ce_a2a", {"world": WORLD, "section": name, "rank": RANK, "error": error}, results_dir=OUT)
    torch.cuda.synchronize()
    ok = agree(error is None)
    if not ok:
        ERRORS.append(name)
        if error is None:
            log(f"{name}: failed on another rank")
    dist.barrier()
    return ok, result


def timed(fn: Callable[[], object], *, trials: int, warmup: int = 3) -> tuple[float, float]:
    """``(device ms, host ms)`` of ``fn()``: medians over ``trials``, maximum over ranks (see the module doc)."""
    host = []
    for _ in range(warmup):
        sync_all()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    host_ms = rank_max(max(host))
    cycles = int(max(2.0, 1.5 * host_ms + 1.0) * SLEEP_CYCLES_PER_MS)
    times = []
    for _ in range(trials):
        sync_all()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return rank_max(statistics.median(times)), rank_max(statistics.median(host[warmup:]))


# --------------------------------------------------------------------------------------------- the all-to-alls
Launch = Callable[[torch.Tensor, int], Callable[[], torch.Tensor]]


def nccl_launch(send: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    """Queue ``n`` NCCL all-to-alls of ``send``; returns the function that waits for them (last result)."""
    works = []
    for _ in range(n):
        recv = torch.empty_like(send)
        works.append((dist.all_to_all_single(recv, send, async_op=True), recv))

    def finish() -> torch.Tensor:
        for work, _ in works:
            work.wait()
        return works[-1][1]

    return finish


def ce_launcher(ce: CopyEngineAllToAll, copy_out: bool) -> Launch:
    def launch(send: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
        handles = [ce.start(send, copy_out=copy_out) for _ in range(n)]
        # a view result is valid until the next start: only the last one may be waited for (the side stream is
        # in order, so waiting for it covers the others)
        return lambda: [h.wait() for h in handles][-1] if copy_out else handles[-1].wait()

    return launch


def send_tensor(mib: int) -> torch.Tensor:
    rows = mib * MiB // (WORLD * COLS * DTYPE.itemsize)
    return torch.randn(WORLD, rows, COLS, device="cuda", dtype=DTYPE)


def nccl_all_to_all(send: torch.Tensor) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv


# ------------------------------------------------------------------------------------------------ the workloads
def workloads() -> dict[str, Callable[[], None]]:
    """Each workload as one call of about ``TARGET_COMPUTE_MS`` (same repetitions on every rank)."""
    a = torch.randn(8192, 4096, device="cuda", dtype=DTYPE)
    b = torch.randn(4096, 14336, device="cuda", dtype=DTYPE) / 64
    c = torch.empty(8192, 14336, device="cuda", dtype=DTYPE)
    steps = {"gemm": lambda: torch.matmul(a, b, out=c)}
    ok, qkv = guarded("sdpa_setup", lambda: _sdpa_inputs())
    if ok:
        q, k, v = qkv
        steps["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    chains = {}
    for name, step in steps.items():
        one, _ = timed(step, trials=5)
        reps = max(1, round(TARGET_COMPUTE_MS / one))

        def chain(step=step, reps=reps) -> None:
            for _ in range(reps):
                step()

        chains[f"{name}x{reps}"] = chain
    return chains


def _sdpa_inputs() -> tuple[torch.Tensor, ...]:
    q, k, v = (torch.randn(1, 32, 16384, 128, device="cuda", dtype=DTYPE) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return q, k, v


# ------------------------------------------------------------------------------------------------- the sections
def measure_alone(backend: str, launch: Launch) -> list[dict]:
    rows = []
    for mib in SIZES_MIB:
        send = send_tensor(mib)
        ms, host = timed(lambda send=send: launch(send, INNER)(), trials=20)
        ms, host = ms / INNER, host / INNER
        link_gbps = mib * MiB * (WORLD - 1) / WORLD / (ms * 1e-3) / 1e9
        row = {"section": "alone", "backend": backend, "mib_per_rank": mib, "ms": ms, "host_ms": host,
               "link_GBps": link_gbps}
        emit(row)
        rows.append(row)
        del send
    return rows


def measure_overlap(backend: str, launch: Launch, chains: dict, n: int, compute_ms: dict) -> list[dict]:
    send = send_tensor(OVERLAP_MIB)
    comm_ms, comm_host = timed(lambda: launch(send, n)(), trials=15)
    rows = []
    for name, chain in chains.items():

        def both(chain=chain) -> None:
            finish = launch(send, n)
            chain()
            finish()

        concurrent, host = timed(both, trials=15)
        hidden = (compute_ms[name] + comm_ms - concurrent) / comm_ms * 100
        row = {"section": "overlap", "backend": backend, "workload": name, "n_a2a": n, "mib_per_rank": OVERLAP_MIB,
               "compute_ms": compute_ms[name], "a2a_alone_ms": comm_ms, "concurrent_ms": concurrent,
               "hidden_pct": hidden, "host_ms": host}
        emit(row)
        rows.append(row)
    return rows


def check_correctness(ce: CopyEngineAllToAll) -> list[dict]:
    rows = []
    for rows_, cols in CHECK_SHAPES:
        torch.manual_seed(1000 * RANK + rows_)
        source = torch.randn(WORLD, rows_, cols, device="cuda", dtype=DTYPE)
        expected = nccl_all_to_all(source)
        send = torch.full_like(source, -7.0)
        torch.cuda._sleep(20 * SLEEP_CYCLES_PER_MS)  # a late producer: start() must wait for it
        send.copy_(source)
        got = ce.start(send).wait()
        ok_copy = torch.equal(got, expected)
        torch.cuda._sleep(20 * SLEEP_CYCLES_PER_MS)
        send.copy_(source * 2)
        ok_view = torch.equal(ce.start(send, copy_out=False).wait(), expected * 2)
        rows.append({"section": "correctness", "check": "shape", "rows": rows_, "cols": cols, "copy_out": ok_copy,
                     "view": ok_view})
    sources = [torch.randn(WORLD, 33 + i, 256, device="cuda", dtype=DTYPE) for i in range(3)]
    expected = [nccl_all_to_all(s) for s in sources]
    handles = [ce.start(s) for s in sources]
    in_flight = all(torch.equal(h.wait(), e) for h, e in zip(handles, expected))
    first = ce.start(sources[0], copy_out=False)
    second = ce.start(sources[1], copy_out=False)
    try:
        first.wait()
        stale_view_refused = False
    except RuntimeError:
        stale_view_refused = True
    in_flight_view = torch.equal(second.wait(), expected[1])
    rows.append({"section": "correctness", "check": "3 in flight; stale view refused", "copy_out": in_flight,
                 "view": in_flight_view and stale_view_refused})
    # many calls in flight beside a GEMM chain, as in the overlap measurement
    base = send_tensor(OVERLAP_MIB)
    sources = [base + i for i in range(16)]
    expected = [nccl_all_to_all(s) for s in sources]
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    handles = [ce.start(s) for s in sources]
    for _ in range(8):
        torch.matmul(a, a)
    busy = all(torch.equal(h.wait(), e) for h, e in zip(handles, expected))
    rows.append({"section": "correctness", "check": f"16 x {OVERLAP_MIB} MiB in flight beside GEMMs",
                 "copy_out": busy, "view": None})
    for row in rows:  # every rank must agree
        row["copy_out"] = agree(row["copy_out"])
        row["view"] = None if row["view"] is None else agree(row["view"])
        emit(row)
    return rows


def profile_ce(ce: CopyEngineAllToAll) -> list[dict]:
    """CUDA activity of three copy-engine all-to-alls of 32 MiB: kernels (SM work) and memcpys, by name."""
    send = send_tensor(OVERLAP_MIB)
    ce.start(send).wait()
    sync_all()
    activity = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activity) as prof:
        for _ in range(3):
            ce.start(send).wait()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name.setdefault(e.name[:80], []).append((e.time_range.end - e.time_range.start) / 1e3)
    rows = []
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        kind = "memcpy" if name.lower().startswith(("memcpy", "memset")) else "kernel"
        rows.append({"section": "profile", "kind": kind, "name": name, "count": len(times), "total_ms": sum(times)})
    for row in rows:
        emit(row)
    return rows


def main() -> int:
    global RANK, WORLD
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    OUT.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(f"ce_a2a: {WORLD} x {env['device']}, torch {env['torch']}, NCCL {torch.cuda.nccl.version()}, bf16; "
        f"results -> {OUT / 'ce_a2a.jsonl'}")

    # 1-3: NCCL
    chains = workloads()
    compute_ms = {}
    for name, chain in chains.items():
        compute_ms[name], _ = timed(chain, trials=15)
        emit({"section": "compute", "workload": name, "ms": compute_ms[name]})
    if RANK == 0:
        print("\n== compute alone")
        print_table([{"workload": k, "ms": v} for k, v in compute_ms.items()], ["workload", "ms"])
    sync_all()
    alone = measure_alone("nccl", nccl_launch)
    nccl_32 = next(r["ms"] for r in alone if r["mib_per_rank"] == OVERLAP_MIB)
    gemm = next(v for k, v in compute_ms.items() if k.startswith("gemm"))
    n = min(256, max(4, round(0.5 * gemm / nccl_32)))
    sync_all()
    overlap = measure_overlap("nccl", nccl_launch, chains, n, compute_ms)
    sync_all()
    if RANK == 0:  # printed now too, in case the copy-engine path takes the process down
        print("\n== NCCL alone")
        print_table(alone, ["mib_per_rank", "ms", "link_GBps", "host_ms"])
        print("\n== NCCL overlap")
        print_table(overlap, ["workload", "n_a2a", "compute_ms", "a2a_alone_ms", "concurrent_ms", "hidden_pct"])
        print("\n== copy engine next", flush=True)

    # 4: the copy engine, every step guarded
    max_bytes = max(SIZES_MIB) * MiB
    ok, ce = guarded("ce_build", lambda: CopyEngineAllToAll(None, DTYPE, max_bytes, timeout_ms=20_000))
    if ok:
        import torch.distributed._symmetric_memory as symm_mem

        backend = getattr(symm_mem, "get_backend", lambda device: "?")(torch.device("cuda", local_rank))
        log(f"symmetric memory backend: {backend}")
        emit({"section": "ce_build", "symm_mem_backend": backend, "capacity_bytes": ce.capacity_bytes})
        ok, checks = guarded("ce_correctness", lambda: check_correctness(ce))
        if ok:
            log("\n== correctness against dist.all_to_all_single (exact)")
            if RANK == 0:
                print_table(checks, ["check", "rows", "cols", "copy_out", "view"])
        for name, copy_out in (("ce", True), ("ce_view", False)):
            ok = ok and guarded(f"{name}_alone", lambda c=copy_out, m=name: alone.extend(
                measure_alone(m, ce_launcher(ce, c))))[0]
            ok = ok and guarded(f"{name}_overlap", lambda c=copy_out, m=name: overlap.extend(
                measure_overlap(m, ce_launcher(ce, c), chains, n, compute_ms)))[0]
        if ok:
            ok, profile = guarded("ce_profile", lambda: profile_ce(ce))
            if ok and RANK == 0:
                print("\n== CUDA activity of 3 copy-engine all-to-alls of 32 MiB (rank 0)")
                print_table(profile, ["kind", "count", "total_ms", "name"])

    if RANK == 0:
        print(f"\n== all-to-all alone (ms per call; {COLS} bf16 columns; link_GBps = bytes to peers / time)")
        table = {}
        for r in alone:
            row = table.setdefault(r["mib_per_rank"], {"MiB/rank": r["mib_per_rank"]})
            row[f"{r['backend']}_ms"] = r["ms"]
            row[f"{r['backend']}_GBps"] = r["link_GBps"]
            row[f"{r['backend']}_host_ms"] = r["host_ms"]
        for row in table.values():
            if "ce_ms" in row and "ce_view_ms" in row:
                row["copy_out_ms"] = row["ce_ms"] - row["ce_view_ms"]
        print_table(list(table.values()), ["MiB/rank", "nccl_ms", "ce_ms", "ce_view_ms", "copy_out_ms", "nccl_GBps",
                                           "ce_GBps", "ce_view_GBps", "nccl_host_ms", "ce_host_ms"])
        print(f"\n== overlap: {n} all-to-alls of {OVERLAP_MIB} MiB per rank beside each workload")
        print_table(overlap, ["workload", "backend", "compute_ms", "a2a_alone_ms", "concurrent_ms", "hidden_pct",
                              "host_ms"])
        print(f"\nsections that failed (on any rank): {ERRORS or 'none'}")
    return 1 if ERRORS else 0


if __name__ == "__main__":
    code = 2
    try:
        code = main()
    except Exception:  # the process must still end cleanly
        traceback.print_exc()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
