import json, os, signal, time, threading
from pathlib import Path
from tests.conftest import deploy
from tests.integration.test_faults import invoke, spawner_pid, proc_start_time, is_alive, wait_until, COUNTER, cgroup_pids

def desc(p):
    try:
        st = Path(f"/proc/{p}/stat").read_text()
        return st.split(")")[0] + ") " + " ".join(st.rsplit(")",1)[1].split()[:3]) + " root=" + os.readlink(f"/proc/{p}/root") + " pdeath?"
    except Exception as e:
        return repr(e)

def test_probe(server, lam, tmp_path):
    deploy(lam, "idle", {"handler.py": COUNTER})
    deploy(lam, "busy", {"handler.py": COUNTER}, Timeout=60)
    invoke(lam, "idle")
    t = threading.Thread(target=lambda: (lambda: invoke(lam, "busy", {"sleep": 20}))(), daemon=True)
    t.start()
    time.sleep(1.0)
    sp = spawner_pid(server)
    print("spawner", sp)
    for p in sorted(cgroup_pids(server.data_dir)):
        print("before", p, desc(p))
    server.proc.kill(); server.proc.wait()
    time.sleep(2)
    for p in sorted(cgroup_pids(server.data_dir)):
        print("after", p, desc(p))
    print("spawner alive", Path(f"/proc/{sp}").exists())
