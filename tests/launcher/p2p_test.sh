#!/usr/bin/env bash
# chorus-bench --p2p end to end (docs/benchmarks.md), on tcp and on shm:
#  1. 3 ranks, small sizes: exit 0, both matrix titles, "0 OK";
#  2. the --json report has one record per ordered pair (6), each with
#     src != dst, bw > 0, lat > 0, wrong == 0, and the named slowest links
#     are the minimum / maximum of the records;
#  3. the printed matrices agree with the records, rows = sender;
#  4. one rank: a note, exit 0, no records;
#  5. tcp times the window's receives into one buffer (osu_bw), shm with
#     --p2p-distinct-buffers into one each: the header and the report say
#     which, and the checked iterations find 0 wrong either way.
# python3 parses the JSON (meson, which builds this, runs on it).
# usage: p2p_test.sh CHORUSRUN CHORUS_BENCH
set -euo pipefail
run=$1
bench=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "p2p_test: $*" >&2; exit 1; }

args=(--p2p --p2p-bytes 64K --p2p-window 4 --p2p-lat-bytes 16 -n 2 -w 1 -c 1)
for tr in tcp shm; do
  out=$tmp/$tr.out
  json=$tmp/$tr.json
  extra=()
  if [ "$tr" = shm ]; then extra=(--p2p-distinct-buffers); fi
  CHORUS_TRANSPORT=$tr "$run" -n 3 -- "$bench" "${args[@]}" "${extra[@]}" --json "$json" > "$out" 2>&1 ||
    { cat "$out"; fail "$tr: chorus-bench --p2p failed"; }
  cat "$out"
  grep -q "# p2p bandwidth (GB/s), 65536 bytes x window 4" "$out" || fail "$tr: no bandwidth matrix"
  grep -q "# p2p latency (us), 16 bytes" "$out" || fail "$tr: no latency matrix"
  if [ "$tr" = shm ]; then buffers="a receive buffer per message"; else buffers="one receive buffer, as osu_bw"; fi
  grep -q "window 4 ($buffers)" "$out" || fail "$tr: the header does not say '$buffers'"
  grep -q "# Transport: $tr" "$out" || fail "$tr: the transport line does not name $tr"
  grep -q "# Slowest link: bandwidth " "$out" || fail "$tr: no slowest-link line"
  grep -q "Out of bounds values : 0 OK" "$out" || fail "$tr: wrong bytes"
  python3 - "$json" "$out" "$tr" <<'EOF' || fail "$tr: the JSON report or the matrices are wrong"
import itertools, json, sys

path, out_path, transport = sys.argv[1:4]
n = 3
with open(path) as f:
    rep = json.load(f)
errors = []
def check(cond, what):
    if not cond:
        errors.append(what)

check(rep.get("mode") == "p2p", "mode is not p2p")
check(rep.get("nranks") == n, "nranks is not 3")
check(rep.get("transport") == transport, f"transport {rep.get('transport')!r}")
check(rep.get("wrong_total") == 0, "wrong_total is not 0")
check(rep.get("distinct_buffers") is (transport == "shm"), f"distinct_buffers {rep.get('distinct_buffers')!r}")
recs = rep.get("results", [])
check(len(recs) == n * (n - 1), f"{len(recs)} records, expected {n * (n - 1)}")
pairs = set()
for r in recs:
    s, d = r["src"], r["dst"]
    check(r.get("mode") == "p2p", f"record {s}->{d}: mode")
    check(s != d, f"record {s}->{d}: src == dst")
    check(0 <= s < n and 0 <= d < n, f"record {s}->{d}: not a rank")
    check((s, d) not in pairs, f"record {s}->{d}: twice")
    pairs.add((s, d))
    check(r["bytes"] == 65536 and r["window"] == 4 and r["lat_bytes"] == 16, f"record {s}->{d}: sizes")
    check(isinstance(r["bw_gbps"], (int, float)) and r["bw_gbps"] > 0, f"record {s}->{d}: bw {r['bw_gbps']}")
    check(isinstance(r["lat_us"], (int, float)) and r["lat_us"] > 0, f"record {s}->{d}: lat {r['lat_us']}")
    check(r["time_us"] > 0, f"record {s}->{d}: time {r['time_us']}")
    check(r["wrong"] == 0 and isinstance(r["wrong"], int), f"record {s}->{d}: wrong {r['wrong']!r}")
check(pairs == set(itertools.permutations(range(n), 2)), f"pairs {sorted(pairs)}")

by_pair = {(r["src"], r["dst"]): r for r in recs}
if recs:
    slow_bw = min(recs, key=lambda r: r["bw_gbps"])
    slow_lat = max(recs, key=lambda r: r["lat_us"])
    sb, sl = rep["slowest"]["bw"], rep["slowest"]["lat"]
    check((sb["src"], sb["dst"]) == (slow_bw["src"], slow_bw["dst"]), "slowest bandwidth link")
    check((sl["src"], sl["dst"]) == (slow_lat["src"], slow_lat["dst"]), "slowest latency link")

# The matrices as printed (chorusrun prefixes rank 0's lines with "[0] "):
# the n lines after each title's column header, row = src, column = dst.
lines = [l[4:] if l.startswith("[0] ") else l for l in open(out_path).read().splitlines()]
for title, field in (("# p2p bandwidth (GB/s)", "bw_gbps"), ("# p2p latency (us)", "lat_us")):
    at = [i for i, l in enumerate(lines) if l.startswith(title)]
    check(len(at) == 1, f"{title!r} printed {len(at)} times")
    if len(at) != 1:
        continue
    check(lines[at[0] + 1].split()[1:] == ["src\\dst"] + [str(d) for d in range(n)], f"{title}: header")
    for s in range(n):
        cells = lines[at[0] + 2 + s].split()
        check(cells[0] == str(s), f"{title}: row {s} is {cells[0]!r}")
        for d in range(n):
            want = "-" if s == d else f"{by_pair[(s, d)][field]:.2f}" if (s, d) in by_pair else "?"
            check(cells[1 + d] == want, f"{title}: cell {s}->{d} is {cells[1 + d]!r}, JSON says {want}")
for e in errors:
    print("p2p_test:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
  echo "p2p_test: $tr: 6 pairs, matrices match the JSON, 0 wrong"
done

"$run" -n 1 -- "$bench" --p2p --json "$tmp/one.json" > "$tmp/one.out" 2>&1 ||
  { cat "$tmp/one.out"; fail "one rank: exit status not 0"; }
grep -q "no pair to measure" "$tmp/one.out" || fail "one rank: no note"
python3 -c 'import json, sys; sys.exit(len(json.load(open(sys.argv[1]))["results"]) != 0)' "$tmp/one.json" ||
  fail "one rank: records in the JSON"
echo "p2p_test: one rank: a note, exit 0"
