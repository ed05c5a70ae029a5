"""bench/kernel_tls.py's pure figures and bench/checked_bulk.py's check, on loopback (no privileges)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from bench import checked_bulk
from bench.kernel_tls import Variant, added, ratio_pairs, summarise


def rr_row(boot, rep, path, p50, p99, cpu):
    return {"boot": boot, "rep": rep, "path": path, "p50": p50, "p99": p99, "datapath_cpu_us_per_rt": cpu}


def test_added_latency_is_against_the_direct_run_of_the_same_repetition_and_boot():
    rows = [rr_row(0, 0, "direct", 100, 200, 0), rr_row(0, 0, "tcpmesh-user", 300, 500, 50),
            rr_row(0, 1, "direct", 150, 260, 0), rr_row(0, 1, "tcpmesh-user", 330, 600, 55),
            rr_row(1, 0, "direct", 50, 90, 0), rr_row(1, 0, "tcpmesh-user", 250, 400, 45),
            rr_row(1, 2, "tcpmesh-user", 999, 999, 99)]   # no direct run in that repetition: left out
    got = {(r["boot"], r["rep"]): (r["added_p50"], r["added_p99"]) for r in added(rows)}
    assert got == {(0, 0): (200, 300), (0, 1): (180, 340), (1, 0): (200, 310)}


def test_ratios_are_taken_within_each_repetition_then_the_median():
    rows, bulk = [], []
    for rep, (user, ktls, stunnel) in enumerate([(200, 100, 160), (300, 210, 200), (100, 90, 50)]):
        rows += [rr_row(0, rep, "direct", 100, 100, 0), rr_row(0, rep, "tcpmesh-user", 100 + user, 100 + user, 2 * user),
                 rr_row(0, rep, "tcpmesh-ktls", 100 + ktls, 100 + ktls, ktls), rr_row(0, rep, "stunnel", 100 + stunnel,
                                                                                100 + stunnel, stunnel)]
        bulk += [{"boot": 0, "rep": rep, "path": "tcpmesh-user", "match": True, "datapath_cpu_ms_per_mb": 10.0,
                  "mbit_per_s": 20.0},
                 {"boot": 0, "rep": rep, "path": "tcpmesh-ktls", "match": rep != 1, "datapath_cpu_ms_per_mb": 6.0,
                  "mbit_per_s": 30.0}]
    paths = ["direct", "tcpmesh-user", "tcpmesh-ktls", "stunnel"]
    summary = summarise(rows, bulk, paths)
    ktls_user = summary["ratios"]["tcpmesh-ktls / tcpmesh-user"]
    assert ktls_user["added_p50"] == {"median": pytest.approx(0.7), "min": 0.5, "max": 0.9, "n": 3}
    assert ktls_user["datapath_cpu_us_per_rt"]["median"] == pytest.approx(0.35)   # 100/400, 210/600, 90/200
    assert ktls_user["bulk_datapath_cpu_ms_per_mb"]["median"] == pytest.approx(0.6)
    assert summary["ratios"]["tcpmesh-user / stunnel"]["added_p50"]["median"] == pytest.approx(1.5)
    assert summary["paths"]["tcpmesh-user"]["added_p50"] == 200
    assert summary["paths"]["tcpmesh-ktls"]["bulk_all_match"] is False   # one transfer of three arrived wrong
    assert summary["paths"]["direct"]["bulk_all_match"] is None          # none sent


def test_ratio_pairs_compare_later_variants_with_the_first_and_each_with_stunnel():
    assert ratio_pairs(["direct", "tcpmesh-a", "tcpmesh-b", "stunnel"]) == [
        ("tcpmesh-b", "tcpmesh-a"), ("tcpmesh-a", "stunnel"), ("tcpmesh-b", "stunnel")]
    assert ratio_pairs(["direct", "tcpmesh-a"]) == []


def test_a_variant_names_its_agents_environment_and_nothing_else():
    assert Variant.parse("tcpmesh-ktls:TCPMESH_PROXY_KERNEL_TLS=on").environment == (("TCPMESH_PROXY_KERNEL_TLS", "on"),)
    assert Variant.parse("tcpmesh-a").environment == ()
    with pytest.raises(ValueError, match="TCPMESH_<NAME>=VALUE"):
        Variant.parse("tcpmesh-x:PATH=/tmp")
    with pytest.raises(ValueError, match="starts with 'tcpmesh'"):
        Variant.parse("stunnel")


def test_a_whole_transfer_matches_and_a_vanished_client_does_not_end_the_server():
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=checked_bulk.serve, args=(listener,), daemon=True).start()
    port = listener.getsockname()[1]
    gone = socket.create_connection(("127.0.0.1", port))
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()   # a reset, not a FIN
    result = checked_bulk.send("127.0.0.1", port, 3_000_000)
    assert result["match"] and result["received_bytes"] == 3_000_000


def test_a_short_or_altered_transfer_does_not_match():
    listener = socket.create_server(("127.0.0.1", 0))

    def lying_server():
        conn, _ = listener.accept()
        with conn:
            while conn.recv(65536):
                pass
            conn.sendall(b"0" * 64 + b" 1000\n")

    threading.Thread(target=lying_server, daemon=True).start()
    result = checked_bulk.send("127.0.0.1", listener.getsockname()[1], 1000)
    listener.close()
    assert not result["match"] and result["received_bytes"] == 1000
