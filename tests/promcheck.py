"""A strict checker and a small parser for the Prometheus text format 0.0.4 (stdlib only).

promtool and the Prometheus scraper accept some expositions that are still wrong; this
checker also rejects them: a histogram without an le="+Inf" bucket, _count differing from
the +Inf bucket, buckets that are not cumulative or not in increasing order, a series that
appears twice, a family split into separate groups, CR characters, a missing final newline,
bad escapes, counters without _total (and non-counters with it) and families without HELP.

    check(text) -> list of problems (empty when the exposition is clean)
    parse(text) -> {(name, frozenset of (label, value) pairs): float}
    python3 tests/promcheck.py < metrics.txt     exits 1 and prints the problems, if any
"""
import math
import re
import sys

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
LVAL = r'"(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE_RE = re.compile(r"^(%s)(?:\{((?:%s=%s)(?:,%s=%s)*,?)?\})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?$"
                       % (NAME, LABEL, LVAL, LABEL, LVAL))
PAIR_RE = re.compile(r"(%s)=(%s)" % (LABEL, LVAL))
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v[1:-1])


def _float(s):
    if s in ("+Inf", "Inf", "-Inf", "NaN"):
        return float(s.replace("Inf", "inf").replace("NaN", "nan"))
    return float(s)  # raises ValueError


def check(text):
    errs = []
    if "\r" in text:
        errs.append("CR characters (line endings must be \\n)")
    if text and not text.endswith("\n"):
        errs.append("last line must end with \\n")
    help_, type_, seen_series, closed, current = {}, {}, set(), set(), None
    hist = {}  # (family, labels-without-le) -> {"buckets": [(le, v)], "count": v}

    def family_of(name):
        for suf in ("_bucket", "_sum", "_count"):
            base = name[: -len(suf)] if name.endswith(suf) else None
            if base and type_.get(base) in ("histogram", "summary"):
                return base
        return name

    def enter(fam, no, current):
        """The family now open; a family met again after another one is an error."""
        if fam != current:
            if fam in closed:
                errs.append("line %d: family %s is not one contiguous group" % (no, fam))
            if current:
                closed.add(current)
        return fam

    lines = text.split("\n")
    for no, line in enumerate(lines[:-1] if text.endswith("\n") else lines, 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            parts = s[1:].split(None, 2)
            if parts and parts[0] in ("HELP", "TYPE"):
                if len(parts) < 2 or not re.fullmatch(NAME, parts[1]):
                    errs.append("line %d: bad %s line" % (no, parts[0])); continue
                fam = parts[1]
                current = enter(fam, no, current)
                if parts[0] == "HELP":
                    if fam in help_:
                        errs.append("line %d: second HELP for %s" % (no, fam))
                    h = parts[2] if len(parts) > 2 else ""
                    if re.search(r"\\[^\\n]", h):
                        errs.append("line %d: HELP may only use \\\\ and \\n escapes" % no)
                    help_[fam] = h
                else:
                    t = parts[2].strip() if len(parts) > 2 else ""
                    if t not in TYPES:
                        errs.append("line %d: unknown type %r" % (no, t))
                    if fam in type_:
                        errs.append("line %d: second TYPE for %s" % (no, fam))
                    if any(k[0] == fam for k in seen_series):
                        errs.append("line %d: TYPE for %s after its samples" % (no, fam))
                    type_[fam] = t
            continue
        m = SAMPLE_RE.match(s)
        if not m:
            errs.append("line %d: not a valid sample line: %r" % (no, line[:80])); continue
        name, lbls, val = m.group(1), m.group(2) or "", m.group(3)
        try:
            fval = _float(val)
        except ValueError:
            errs.append("line %d: value %r is not a float" % (no, val)); continue
        pairs = [(k, _unescape(v)) for k, v in PAIR_RE.findall(lbls)]
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            errs.append("line %d: duplicate label name" % no)
        if any(k.startswith("__") for k in keys):
            errs.append("line %d: label names starting with __ are reserved" % no)
        fam = family_of(name)
        current = enter(fam, no, current)
        key = (name, tuple(sorted(pairs)))
        if key in seen_series:
            errs.append("line %d: duplicate series %s%s" % (no, name, dict(pairs)))
        seen_series.add(key)
        t = type_.get(fam, "untyped")
        if t == "counter" and not fam.endswith("_total"):
            errs.append("line %d: counter %s should end in _total" % (no, fam))
        if t != "counter" and fam.endswith("_total"):
            errs.append("line %d: non-counter %s ends in _total" % (no, fam))
        if fam not in help_:
            errs.append("line %d: no HELP for %s" % (no, fam))
        if t == "histogram":
            rest = tuple(sorted((k, v) for k, v in pairs if k != "le"))
            h = hist.setdefault((fam, rest), {"buckets": [], "count": None})
            if name == fam + "_bucket":
                le = dict(pairs).get("le")
                if le is None:
                    errs.append("line %d: _bucket without le" % no); continue
                try:
                    h["buckets"].append((_float(le), fval))
                except ValueError:
                    errs.append("line %d: le=%r is not a float" % (no, le))
            elif name == fam + "_count":
                h["count"] = fval
    for (fam, rest), h in hist.items():
        b = h["buckets"]
        where = "%s%s" % (fam, dict(rest))
        if not b or not math.isinf(b[-1][0]):
            errs.append("%s: missing or misplaced le=\"+Inf\" bucket" % where)
        if [x[0] for x in b] != sorted(x[0] for x in b):
            errs.append("%s: buckets not in increasing le order" % where)
        if any(b[i][1] > b[i + 1][1] for i in range(len(b) - 1)):
            errs.append("%s: bucket counts not cumulative" % where)
        if b and h["count"] is not None and b[-1][1] != h["count"]:
            errs.append("%s: _count != +Inf bucket" % where)
        if h["count"] is None:
            errs.append("%s: missing _count" % where)
    return errs


def parse(text):
    """Every sample as {(name, frozenset(labels.items())): value}; raises ValueError on a
    line that is not a comment, a blank or a sample, and on a series given twice."""
    samples = {}
    for no, line in enumerate(text.split("\n"), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = SAMPLE_RE.match(s)
        if not m:
            raise ValueError("line %d: not a valid sample line: %r" % (no, line[:80]))
        pairs = frozenset((k, _unescape(v)) for k, v in PAIR_RE.findall(m.group(2) or ""))
        key = (m.group(1), pairs)
        if key in samples:
            raise ValueError("line %d: duplicate series %s%s" % (no, m.group(1), dict(pairs)))
        samples[key] = _float(m.group(3))
    return samples


if __name__ == "__main__":
    problems = check(sys.stdin.read())
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)
