"""Supplementary: RSS vs PSS (proportional set size, shared pages split) of this script's Ray processes, 10 s after init."""
import os
import sys
import time

import psutil
import ray

dash = sys.argv[1] == "1"
ray.init(num_cpus=2, include_dashboard=dash, _temp_dir=os.environ.get("RAYDASH_DIR", "/tmp/raydash") + "/rt")
time.sleep(10)
me = psutil.Process(); rss = pss = uss = 0; n = 0
for c in me.children(recursive=True):
    try:
        if "ray" not in " ".join(c.cmdline()): continue
        m = c.memory_full_info(); rss += m.rss; pss += m.pss; uss += m.uss; n += 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
print(f"dash={dash} nproc={n} RSS_MB={rss/2**20:.1f} PSS_MB={pss/2**20:.1f} USS_MB={uss/2**20:.1f}")
ray.shutdown()
