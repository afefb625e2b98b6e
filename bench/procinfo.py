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
