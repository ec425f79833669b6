"""Metric families and the Prometheus text exposition format 0.0.4.

Written by hand on the standard library: the daemon needs three metric
types, a lock per family, and a few dozen lines of output;
``prometheus_client`` would add a dependency (and its process-global
registry) to the daemon's runtime for that. Its parser is the tests'
oracle of this format.

Thread safety: a family's samples change under the family's own lock,
taken once per counted event (``+=`` on a dict item is not atomic
between threads); a scrape copies them under the same lock. No lock is
held across I/O or across families.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: What a scraper is told it reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Label values of one sample, in the order of its family's label names.
Labels = tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One line of a family: ``name{labels} value``; ``suffix`` follows
    the family's name (``_bucket``, ``_sum``, ``_count``)."""

    labels: Labels
    value: float
    suffix: str = ""
    #: A label after the family's own (``le`` of a histogram bucket).
    extra: tuple[str, str] | None = None


@dataclass(frozen=True)
class Snapshot:
    """A family as one scrape reads it."""

    name: str
    help: str
    type: str
    label_names: tuple[str, ...]
    samples: Sequence[Sample]


class _Values:
    """One value per label values, changed under the family's lock."""

    type = "untyped"

    def __init__(self, name: str, help: str,
                 label_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = label_names
        self._lock = threading.Lock()
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def value(self, labels: Labels = ()) -> float:
        with self._lock:
            return self._values.get(labels, 0)

    def snapshot(self) -> Snapshot:
        with self._lock:
            samples = [Sample(k, v) for k, v in self._values.items()]
        return Snapshot(self.name, self.help, self.type, self.label_names,
                        samples)


class Counter(_Values):
    """A count that only goes up, by label values (``name`` ends in
    ``_total``)."""

    type = "counter"


class Gauge(_Values):
    """A value that goes up and down, by label values."""

    type = "gauge"

    def set(self, labels: Labels, value: float) -> None:
        with self._lock:
            self._values[labels] = value


class Histogram:
    """Observations counted in cumulative buckets, by label values."""

    type = "histogram"

    def __init__(self, name: str, help: str, label_names: tuple[str, ...],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.label_names = label_names
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        # labels -> [count per bucket (+Inf last), sum]
        self._values: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            entry = self._values.get(labels)
            if entry is None:
                entry = self._values[labels] = (
                    [0] * (len(self.buckets) + 1), [0.0])
            entry[0][index] += 1
            entry[1][0] += value

    def snapshot(self) -> Snapshot:
        with self._lock:
            values = [(k, list(counts), total[0])
                      for k, (counts, total) in self._values.items()]
        samples: list[Sample] = []
        bounds = [*map(format_value, self.buckets), "+Inf"]
        for labels, counts, total in values:
            cumulative = 0
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                samples.append(Sample(labels, cumulative, "_bucket",
                                      ("le", bound)))
            samples.append(Sample(labels, total, "_sum"))
            samples.append(Sample(labels, cumulative, "_count"))
        return Snapshot(self.name, self.help, self.type, self.label_names,
                        samples)


def escape_label(value: str) -> str:
    """A label value as it goes between double quotes."""
    return (value.replace("\\", "\\\\").replace("\n", "\\n")
            .replace('"', '\\"'))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _sample_line(snapshot: Snapshot, sample: Sample) -> str:
    pairs = list(zip(snapshot.label_names, sample.labels, strict=True))
    if sample.extra is not None:
        pairs.append(sample.extra)
    labels = ",".join(f'{name}="{escape_label(value)}"'
                      for name, value in pairs)
    labels = "{" + labels + "}" if labels else ""
    return (f"{snapshot.name}{sample.suffix}{labels} "
            f"{format_value(sample.value)}")


def render(snapshots: Iterable[Snapshot]) -> bytes:
    """The text a scraper reads: HELP and TYPE before each family's
    samples."""
    lines: list[str] = []
    for snapshot in snapshots:
        lines.append(f"# HELP {snapshot.name} {escape_help(snapshot.help)}")
        lines.append(f"# TYPE {snapshot.name} {snapshot.type}")
        lines.extend(_sample_line(snapshot, s) for s in snapshot.samples)
    return ("\n".join(lines) + "\n").encode("utf-8")
