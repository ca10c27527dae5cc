#!/usr/bin/env python3
"""Independent ESP peer for enc's interop test: scapy's IPsec implementation.

Usage: interop.py CASE.json

CASE.json (written by tests/scapy_interop.rs) holds one SA (spi, key, salt, outer src/dst)
and two lists:
  "decrypt": ESP packets sealed by enc (hex, without outer IP header) and the high half of
             each one's 64-bit sequence number; scapy decrypts them;
  "encrypt": sequence numbers (64-bit) and inner payloads; scapy builds inner IPv4/UDP
             packets and encrypts them.

With "nat_t": true the SA is ESP in UDP (RFC 3948, scapy's nat_t_header, ports 4500 at both
ends): enc's packets are decrypted from IP/UDP 4500/ESP, and scapy's are printed as the UDP
payload after checking the UDP header.

Output, one line per packet, on stdout:
  decrypted <index> <inner packet hex>
  encrypted <seq> <inner packet hex> <ESP packet hex, without outer IP header>

AES-GCM with ESN in scapy (scapy/layers/ipsec.py, CryptAlgo.encrypt/decrypt): the nonce is
salt || IV and, with esn_en=True, the AAD is SPI || esn (high half) || seq (low half), as
RFC 4106 section 5 prescribes. scapy picks random IVs; the receiver reads the IV from the
packet.
"""

import json
import sys

from scapy.all import IP, UDP, Raw, raw
from scapy.layers.ipsec import ESP, SecurityAssociation


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    key = bytes.fromhex(case["key"])
    salt = bytes.fromhex(case["salt"])
    src, dst = case["src"], case["dst"]
    nat_t = case.get("nat_t", False)
    nat_t_header = UDP(sport=4500, dport=4500) if nat_t else None

    def sa():
        return SecurityAssociation(
            ESP,
            spi=case["spi"],
            crypt_algo="AES-GCM",
            crypt_key=key + salt,
            auth_algo="NULL",
            esn_en=True,
            esn=0,
            tunnel_header=IP(src=src, dst=dst),
            nat_t_header=nat_t_header,
        )

    rx = sa()
    for i, item in enumerate(case["decrypt"]):
        esp = Raw(bytes.fromhex(item["esp"]))
        if nat_t:
            outer = IP(raw(IP(src=src, dst=dst) / UDP(sport=4500, dport=4500, chksum=0) / esp))
        else:
            outer = IP(raw(IP(src=src, dst=dst, proto=50) / esp))
        assert ESP in outer, "not parsed as ESP"
        inner = rx.decrypt(outer, esn=item["hi"])
        print("decrypted", i, raw(inner).hex(), flush=True)

    tx = sa()
    for item in case["encrypt"]:
        seq = item["seq"]
        hi, lo = seq >> 32, seq & 0xFFFFFFFF
        # scapy treats 0 as "not given" for both (seq_num or self.seq_num, esn or self.esn).
        assert lo != 0, "scapy cannot send a low half of 0"
        inner = IP(src=item["inner_src"], dst=item["inner_dst"]) / UDP(
            sport=4321, dport=8765
        ) / Raw(item["payload"].encode())
        inner = IP(raw(inner))
        outer = tx.encrypt(inner, seq_num=lo, esn=hi)
        if nat_t:
            outer = IP(raw(outer))
            udp = outer[UDP]
            assert outer.proto == 17 and (udp.sport, udp.dport) == (4500, 4500), outer.summary()
            assert udp.len == 8 + len(udp.payload), "UDP length"
            wire = raw(udp.payload)
        else:
            wire = raw(outer[ESP])
        print("encrypted", seq, raw(inner).hex(), wire.hex(), flush=True)


if __name__ == "__main__":
    main()
