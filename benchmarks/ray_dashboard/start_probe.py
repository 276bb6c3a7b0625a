"""Usage: python start_probe.py <dashboard:0|1> <label>
Measures ray.init wall time, RSS of ray processes, and idle CPU of ray processes over 30 s."""
import json
import os
import sys
import time

import psutil  # ray 2.60 vendors psutil in ray/thirdparty_files (not a pip dependency); importing ray puts it on sys.path
import ray

dash = sys.argv[1] == "1"
label = sys.argv[2]
me = psutil.Process()
ancestors = {p.pid for p in me.parents()}

def ray_procs(foreign=False):
    # Processes whose cmdline contains 'ray', excluding this script and its ancestors.
    # Another Ray cluster (from /work/main/.venv, not ours) may be running on this host, so by default
    # only descendants of this script (= the Ray cluster this script started) are counted;
    # foreign=True returns the other ones instead (for reporting contention only).
    mine = {c.pid for c in me.children(recursive=True)}
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == me.pid or p.pid in ancestors:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "ray" in cmd and ((p.pid in mine) != foreign):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out

def snapshot(foreign=False):
    d = {}
    for p in ray_procs(foreign):
        try:
            with p.oneshot():
                ct = p.cpu_times()
                d[p.pid] = dict(rss=p.memory_info().rss, cpu=ct.user + ct.system,
                                name=" ".join(p.cmdline())[:90])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return d

t = time.time()
ctx = ray.init(num_cpus=2, include_dashboard=dash, _temp_dir=os.environ.get("RAYDASH_DIR", "/tmp/raydash") + "/rt")
init_s = time.time() - t
print(f"INIT_S {init_s:.3f}")
if dash:
    print("DASHBOARD_URL", ctx.dashboard_url)
s0 = snapshot()
f0 = snapshot(foreign=True)
print(f"FOREIGN_RAY_PROCS_T0 {len(f0)} LOADAVG {psutil.getloadavg()}")
rss0 = sum(v["rss"] for v in s0.values())
print(f"RSS_MB_T0 {rss0/2**20:.1f} NPROC_T0 {len(s0)}")
for pid, v in sorted(s0.items()):
    print(f"  t0 {pid} rss={v['rss']/2**20:.1f}MB cpu={v['cpu']:.2f}s {v['name']}")
time.sleep(30)
s1 = snapshot()
f1 = snapshot(foreign=True)
foreign_cpu = sum(v["cpu"] - f0.get(pid, {"cpu": 0.0})["cpu"] for pid, v in f1.items())
print(f"FOREIGN_RAY_PROCS_T30 {len(f1)} FOREIGN_CPU_S_30 {foreign_cpu:.2f} LOADAVG {psutil.getloadavg()}")
rss1 = sum(v["rss"] for v in s1.values())
idle_cpu = sum(v["cpu"] - s0.get(pid, {"cpu": 0.0})["cpu"] for pid, v in s1.items())
print(f"RSS_MB_T30 {rss1/2**20:.1f} NPROC_T30 {len(s1)}")
for pid, v in sorted(s1.items()):
    d = v["cpu"] - s0.get(pid, {"cpu": 0.0})["cpu"]
    print(f"  t30 {pid} rss={v['rss']/2**20:.1f}MB dcpu={d:.2f}s {v['name']}")
print(f"IDLE_CPU_S_30 {idle_cpu:.2f}")
ray.shutdown()
json.dump(dict(label=label, dash=dash, init_s=init_s, rss_mb_t0=rss0/2**20,
               rss_mb_t30=rss1/2**20, nproc_t0=len(s0), nproc_t30=len(s1),
               idle_cpu_s_30=idle_cpu, foreign_procs=len(f1), foreign_cpu_s_30=foreign_cpu, dashboard_url=getattr(ctx, "dashboard_url", None)),
          open(os.environ.get("RAYDASH_DIR", "/tmp/raydash") + f"/start_{label}.json", "w"))
