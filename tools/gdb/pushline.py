# gdb extension for Pushline: the allocation-site table of a live process or a core
# (gcore -o core PID), without the server's help: the talk's `lgcstat`, for Pushline.
#
#   gdb -batch -ex 'source tools/gdb/pushline.py' -ex 'pushline-sites' ./target/release/pushline core.PID
#
# Commands:
#   pushline-sites    live bytes, live allocations and total allocations per site
#
# The layout is that of `SiteTable` in alloc/src/table.rs: magic "PLSITES1",
# version u32, sites u32, shards u32, name_len u32, names[sites][name_len], then at a
# 64-byte boundary counters[sites][shards], 64 bytes each: live_bytes i64,
# live_allocs i64, total_allocs u64, total_bytes u64.

import struct

import gdb


def _read_table():
    try:
        address = int(gdb.parse_and_eval("(unsigned long)&PUSHLINE_ALLOC_SITES"))
    except gdb.error as e:
        raise gdb.GdbError("no PUSHLINE_ALLOC_SITES symbol: not a Pushline binary, or stripped (%s)" % e)
    inferior = gdb.selected_inferior()
    head = bytes(inferior.read_memory(address, 24))
    magic, version, sites, shards, name_len = struct.unpack("<8sIIII", head)
    if magic != b"PLSITES1":
        raise gdb.GdbError("site table has magic %r, not PLSITES1" % magic)
    names_end = 24 + sites * name_len
    counters = (names_end + 63) // 64 * 64
    raw = bytes(inferior.read_memory(address, counters + sites * shards * 64))
    rows = []
    for site in range(sites):
        name = raw[24 + site * name_len: 24 + (site + 1) * name_len].split(b"\0")[0].decode()
        live_bytes = live_allocs = total_allocs = total_bytes = 0
        for shard in range(shards):
            at = counters + (site * shards + shard) * 64
            lb, la, ta, tb = struct.unpack("<qqQQ", raw[at: at + 32])
            live_bytes += lb
            live_allocs += la
            total_allocs += ta
            total_bytes += tb
        rows.append((name, live_bytes, live_allocs, total_allocs, total_bytes))
    return rows


class PushlineSites(gdb.Command):
    """Print Pushline's allocation-site table: live bytes and allocations per site."""

    def __init__(self):
        super().__init__("pushline-sites", gdb.COMMAND_DATA)

    def invoke(self, arg, from_tty):
        rows = _read_table()
        print("%-18s %14s %12s %14s %16s" % ("site", "live bytes", "live allocs", "allocs total", "bytes total"))
        for name, lb, la, ta, tb in rows:
            print("%-18s %14d %12d %14d %16d" % (name, lb, la, ta, tb))
        print("%-18s %14d %12d" % ("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))


PushlineSites()
