"""Does a sklearn load in a thread free MLServer's event loop? (issue 13, task tload; no server)

One python: two asyncio tasks predict one row at a time on 3 loaded bench_peers forests (the
loop an embedded MLServer runs its inferences on) while 24 more forests load one after another,
keeping 10, each load followed by malloc_trim(0) as the embedded server does, and 20 ms of
serving between loads. Modes: `inline` (joblib.load on the loop, as mlserver_sklearn 1.7 does),
`thread` (asyncio.to_thread(joblib.load)), `bytes` (the file read whole, then unpickled from
memory, in a thread: one read syscall instead of ~3,300). Prints the load time, the
predictions' latency during the loads, and the process's CPU.

    MALLOC_MMAP_THRESHOLD_=4194304 .venv/bin/python benchmarks/bench_load_thread.py MODE
    (SWI=0.0005 sets sys.setswitchinterval; STORE= the forests' dir, default: bench_peers' workdir)

The forests come from `bench_peers.py --workloads big` (its workdir's store-big-100).
"""
import io, tempfile, asyncio, ctypes, os, resource, statistics, sys, time
import joblib, numpy as np
STORE = os.environ.get("STORE") or os.path.join(tempfile.gettempdir(), "modelshelf-bench-peers", "store-big-100")
mode = sys.argv[1]; sys.setswitchinterval(float(os.environ.get("SWI", "0.005"))); nloads = int(sys.argv[2]) if len(sys.argv) > 2 else 24
trim = ctypes.CDLL("libc.so.6").malloc_trim
names = sorted(os.listdir(STORE))
held = {}
def load(n): return joblib.load(f"{STORE}/{n}/model.joblib")
def load_bytes(n):
    with open(f"{STORE}/{n}/model.joblib", "rb") as f:
        return joblib.load(io.BytesIO(f.read()))
x = np.zeros((1, 4))
async def main():
    for n in names[:3]: held[n] = load(n)
    serve = names[:3]
    lat = []; stop = False
    async def client():
        i = 0
        while not stop:
            t = time.perf_counter()
            held[serve[i % 3]].predict(x); i += 1
            await asyncio.sleep(0)
            lat.append(time.perf_counter() - t)
    tasks = [asyncio.create_task(client()) for _ in range(2)]
    await asyncio.sleep(0.5); lat.clear()
    r0 = resource.getrusage(resource.RUSAGE_SELF); w0 = time.perf_counter()
    lt = []; order = names[3:3 + nloads]; lru = []
    for n in order:
        t = time.perf_counter()
        if mode == "inline": m = load(n)
        elif mode == "bytes": m = await asyncio.to_thread(load_bytes, n)
        else: m = await asyncio.to_thread(load, n)
        lt.append(time.perf_counter() - t)
        held[n] = m; lru.append(n)
        if len(lru) > 10: del held[lru.pop(0)]
        trim(0)
        await asyncio.sleep(0.02)  # some serving between loads
    w = time.perf_counter() - w0; r1 = resource.getrusage(resource.RUSAGE_SELF)
    stop = True; await asyncio.gather(*tasks)
    q = sorted(lat); p = lambda f: 1000 * q[min(len(q) - 1, int(f * len(q)))]
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{mode}: loads={len(lt)} load ms mean={1000*statistics.fmean(lt):.1f} p50={1000*statistics.median(lt):.1f} | "
          f"predicts={len(lat)} ({len(lat)/w:.0f}/s) lat p50={p(.5):.2f} p95={p(.95):.2f} p99={p(.99):.2f} max={p(1):.1f} ms | "
          f"wall={w:.2f}s cpu={cpu:.2f}s (sys {r1.ru_stime - r0.ru_stime:.2f}) = {cpu/w:.2f} cores")
asyncio.run(main())
