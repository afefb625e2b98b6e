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


def _stat_fields(pid):
    """/proc/<pid>/stat from its third field (the state) on: the name before it may hold spaces."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def ended_children_cpu_seconds(pid):
    """cutime + cstime: the CPU seconds of a process's children that ended and were waited for.
    A postmaster waits for every backend it started, so the difference over a run counts the
    backends that ended within it, even those too short-lived to be seen."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / CLK_TCK  # fields 16 and 17 of proc(5)


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
