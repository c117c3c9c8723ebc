#!/usr/bin/env python3
"""Deterministic benchmark data: N people and N machines, as JSONL (pharos load) and LDIF (slapadd).

    python3 bench/dataset.py --size 100000 --jsonl data.jsonl --ldif data.ldif --surnames sn.tsv

The same size always gives the same bytes (no random module: every value is derived from the
record's number through a fixed integer hash), so Pharos and slapd load identical directories.

People: alias, name "First Last", email, phone, title, department. Surnames are made of
syllables and are all distinct from the first names; there are about N/2 of them and each is
carried by 1, 2 or 3 people (in the repeating pattern 1, 2, 3, 2), so an exact lookup on a
surname returns 1-3 entries and the expected count is known for every reply.

Machines: hostname, ip (10.0.0.0/8), mac (locally administered 02:...), os, role, owner (the
alias of a person).
"""

import argparse
import json
import sys

BASE_DN = "dc=pharos,dc=test"
PEOPLE_DN = "ou=people," + BASE_DN
HOSTS_DN = "ou=hosts," + BASE_DN

FIRST_NAMES = (
    "Ada Alan Alice Amara Ana Anders Anna Arjun Astrid Ben Bianca Boris Carla Carlos Chen Chloe "
    "Clara Daniel Dana David Diego Elena Eli Emil Emma Erik Eva Farah Felix Fiona Frank Grace Hana "
    "Hugo Ian Ines Ingrid Ivan Jack James Jana Jonas Jorge Julia Kai Karl Kate Kenji Lara Leo Lena "
    "Liam Lina Luca Lucy Maja Marco Maria Mark Marta Max Maya Mia Mila Nadia Nico Nina Noah Nora "
    "Olga Omar Oscar Paul Pia Priya Rafael Rosa Ruth Sam Sara Sofia Sven Tara Theo Tom Vera Victor "
    "Wei Yara Yusuf Zoe"
).split()
TITLES = ("Engineer", "Senior Engineer", "Analyst", "Manager", "Technician", "Designer",
          "Administrator", "Researcher", "Accountant", "Director", "Support Specialist", "Intern")
DEPARTMENTS = ("Engineering", "Operations", "Finance", "Sales", "Support", "Research",
               "Facilities", "Legal", "Marketing", "IT", "People", "Logistics")
OSES = ("Debian 12", "Ubuntu 24.04", "Alpine 3.20", "FreeBSD 14", "Windows 11", "macOS 14",
        "RouterOS 7", "TrueNAS 13", "Fedora 40", "OpenWrt 23")
ROLES = ("web", "db", "nas", "router", "switch", "printer", "laptop", "desktop", "build",
         "camera", "ap", "vm")

ONSETS = "b c d f g h k l m n p r s t v z".split()          # 16
VOWELS = "a e i o u".split()                                # 5
ENDINGS = ("", "n", "r", "s", "t", "l")                     # 6
SYLLABLES = [c + v for c in ONSETS for v in VOWELS]         # 80
SURNAME_SPACE = len(SYLLABLES) ** 3 * len(ENDINGS)          # 3,072,000 distinct surnames
SURNAME_STEP = 1_234_567                                    # coprime with SURNAME_SPACE
GROUP_SIZES = (1, 2, 3, 2)                                  # people per surname, repeating


def mix(x):
    """splitmix64 finaliser: a fixed, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


FIRST_LOWER = frozenset(n.lower() for n in FIRST_NAMES)


def surname(k):
    """The k-th surname: three syllables and an ending, a bijection of k (so all distinct)."""
    n = (k * SURNAME_STEP + 7) % SURNAME_SPACE
    n, end = divmod(n, len(ENDINGS))
    n, s3 = divmod(n, len(SYLLABLES))
    s1, s2 = divmod(n, len(SYLLABLES))
    word = SYLLABLES[s1] + SYLLABLES[s2] + SYLLABLES[s3] + ENDINGS[end]
    return word.capitalize()


class Dataset:
    """The records of one size; people and machines are built on demand from their number."""

    def __init__(self, size):
        if size < 1 or size > SURNAME_SPACE:
            raise ValueError(f"size must be 1..{SURNAME_SPACE}")
        self.size = size
        # people i -> (surname number, position in its group)
        self.groups = []                  # (surname, count) in order
        self.person_group = []            # per person: (group number, position)
        k, g = 0, 0
        while len(self.person_group) < size:
            name = surname(k)
            k += 1
            if name.lower() in FIRST_LOWER:
                continue
            count = min(GROUP_SIZES[g % len(GROUP_SIZES)], size - len(self.person_group))
            for pos in range(count):
                self.person_group.append((len(self.groups), pos))
            self.groups.append((name, count))
            g += 1

    def person(self, i):
        group, pos = self.person_group[i]
        last = self.groups[group][0]
        h = mix(i)
        first = FIRST_NAMES[h % len(FIRST_NAMES)]
        alias = (first[0] + last).lower() + (str(pos + 1) if pos else "")
        return {
            "type": "person",
            "alias": alias,
            "name": f"{first} {last}",
            "email": f"{alias}@example.org",
            "phone": f"+1 555 {(h >> 8) % 1000:03d} {(h >> 20) % 10000:04d}",
            "title": TITLES[(h >> 32) % len(TITLES)],
            "department": DEPARTMENTS[(h >> 40) % len(DEPARTMENTS)],
        }

    def machine(self, i):
        h = mix(i + 0x5EED)
        role = ROLES[h % len(ROLES)]
        n = i + 1
        p = (i * 0x9E3779B1) & 0xFFFFFFFF              # a bijection of i: every mac distinct
        return {
            "type": "machine",
            "hostname": f"{role}-{i:07d}.lab",
            "ip": [f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"],
            "mac": ["02:00:" + ":".join(f"{(p >> s) & 255:02x}" for s in (24, 16, 8, 0))],
            "os": OSES[(h >> 8) % len(OSES)],
            "role": role,
            "owner": self.person(h % self.size)["alias"] if self.size else "",
        }

    def first_names_lower(self):
        return FIRST_LOWER

    # -- outputs -------------------------------------------------------------

    def write_jsonl(self, out):
        dumps = json.dumps
        for i in range(self.size):
            out.write(dumps(self.person(i), separators=(",", ":")) + "\n")
        for i in range(self.size):
            out.write(dumps(self.machine(i), separators=(",", ":")) + "\n")

    def write_ldif(self, out):
        out.write(f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\n"
                  f"dc: pharos\no: pharos\n\n")
        out.write(f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n\n")
        out.write(f"dn: {HOSTS_DN}\nobjectClass: organizationalUnit\nou: hosts\n\n")
        for i in range(self.size):
            p = self.person(i)
            first, last = p["name"].split(" ", 1)
            out.write(f"dn: uid={p['alias']},{PEOPLE_DN}\nobjectClass: inetOrgPerson\n"
                      f"uid: {p['alias']}\ncn: {p['name']}\nsn: {last}\ngivenName: {first}\n"
                      f"mail: {p['email']}\ntelephoneNumber: {p['phone']}\n"
                      f"title: {p['title']}\nou: {p['department']}\n\n")
        for i in range(self.size):
            m = self.machine(i)
            out.write(f"dn: cn={m['hostname']},{HOSTS_DN}\nobjectClass: device\n"
                      f"objectClass: ipHost\nobjectClass: ieee802Device\ncn: {m['hostname']}\n"
                      f"ipHostNumber: {m['ip'][0]}\nmacAddress: {m['mac'][0]}\n"
                      f"description: {m['os']}; {m['role']}\n"
                      f"owner: uid={m['owner']},{PEOPLE_DN}\n\n")

    def write_surnames(self, out):
        """One line per surname: the surname, a tab, how many people carry it."""
        for name, count in self.groups:
            out.write(f"{name}\t{count}\n")

    # -- expected answers ----------------------------------------------------

    def exact_queries(self, limit):
        """(surname, expected count) for `name=<surname>` / `(sn=<surname>)`, in a fixed
        shuffled order (so the 1, 2, 3, 2 pattern is sampled fairly)."""
        n = len(self.groups)
        return [self.groups[mix(j) % n] for j in range(min(limit, n))]

    def prefix_queries(self, limit, length=5):
        """(prefix, expected count) for wildcard lookups `name=<prefix>*` / `(sn=<prefix>*)`.

        Prefixes are the first ``length`` letters of surnames; a prefix that any first name
        starts with is skipped, so the Ph answer (any word of name) and the LDAP answer (sn)
        have the same count.
        """
        counts = {}
        for name, count in self.groups:
            p = name[:length].lower()
            counts[p] = counts.get(p, 0) + count
        out, seen = [], set()
        for name, _ in self.exact_queries(limit * 4):
            p = name[:length].lower()
            if p in seen or any(f.startswith(p) for f in FIRST_LOWER):
                continue
            seen.add(p)
            out.append((p, counts[p]))
            if len(out) >= limit:
                break
        return out

    def machine_queries(self, limit):
        """(ip, mac) of machines in a fixed shuffled order; each matches exactly one machine."""
        out = []
        for j in range(min(limit, self.size)):
            m = self.machine(mix(j + 77) % self.size)
            out.append((m["ip"][0], m["mac"][0]))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="people, and as many machines")
    ap.add_argument("--jsonl", metavar="FILE", help="write records for `pharos.py load`")
    ap.add_argument("--ldif", metavar="FILE", help="write entries for `slapadd`")
    ap.add_argument("--surnames", metavar="FILE", help="write surname<TAB>count lines")
    args = ap.parse_args(argv)
    data = Dataset(args.size)
    for path, method in ((args.jsonl, data.write_jsonl), (args.ldif, data.write_ldif),
                         (args.surnames, data.write_surnames)):
        if path:
            with (sys.stdout if path == "-" else open(path, "w", encoding="utf-8")) as out:
                method(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
