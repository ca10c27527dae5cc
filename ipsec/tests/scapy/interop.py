#!/usr/bin/env python3
"""Independent ESP peer for enc's interop test: scapy's IPsec implementation.

Usage: interop.py CASE.json

CASE.json (written by tests/scapy_interop.rs) holds one SA (spi, key, salt, outer src/dst)
and two lists:
  "decrypt": ESP packets sealed by enc (hex, without outer IP header) and the high half of
             each one's 64-bit sequence number; scapy decrypts them;
  "encrypt": sequence numbers (64-bit) and inner payloads; scapy builds inner IPv4/UDP
             packets and encrypts them.

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
        )

    rx = sa()
    for i, item in enumerate(case["decrypt"]):
        outer = IP(raw(IP(src=src, dst=dst, proto=50) / Raw(bytes.fromhex(item["esp"]))))
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
        print("encrypted", seq, raw(inner).hex(), raw(outer[ESP]).hex(), flush=True)


if __name__ == "__main__":
    main()
