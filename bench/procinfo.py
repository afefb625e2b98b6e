"""A process's memory and CPU time from /proc, for the benchmarks."""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_status(pid, keys=("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")):
    """The given /proc/<pid>/status fields, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024.0
    return out


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_busy_seconds():
    """CPU seconds all cores spent on anything but idling since boot (/proc/stat), so that the
    difference over a run says how much of the machine it used."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    # guest and guest_nice (10th and 11th) are counted in user and nice already.
    return (sum(ticks[:8]) - idle - iowait) / CLK_TCK


def worker_pid(cluster):
    """The pid of a test bed cluster's aquapeer worker."""
    pids = cluster.backend_pids("aquapeer worker")
    if len(pids) != 1:
        raise RuntimeError(f"{cluster.name}: expected one aquapeer worker, found {pids}")
    return pids[0]
