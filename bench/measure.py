"""What the benchmarks share for reporting: latency percentiles and the end of a log."""


def percentiles(samples_s):
    """(p50, p99) of samples in seconds, in milliseconds; (None, None) without samples."""
    if not samples_s:
        return None, None
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0  # noqa: E731
    return pick(0.5), pick(0.99)


def tail(path, lines=25):
    """The last lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
