"""Reads a Strata archive with pyarrow, as another Parquet reader would.

Usage: read_archive.py ARCHIVE_DIR KEK_ID [--no-key]
The KEK (64 hex characters) comes from the STRATA_KEK environment variable. Prints one JSON
object: {"path of each manifest file": rows read}. With --no-key, tries a plain read of every
file and prints {"path": "error message"}: each must fail.
"""
import base64
import json
import os
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class StrataKmsClient(pe.KmsClient):
    """Unwraps data keys the way Strata wraps them: AES-256-GCM under the KEK, KEK id as AAD,
    base64(nonce || ciphertext || tag)."""

    def __init__(self, keks):
        super().__init__()
        self.keks = keks

    def wrap_key(self, key_bytes, master_key_identifier):
        raise NotImplementedError("read only")

    def unwrap_key(self, wrapped_key, master_key_identifier):
        raw = base64.b64decode(wrapped_key)
        kek = self.keks[master_key_identifier]
        return AESGCM(kek).decrypt(raw[:12], raw[12:], master_key_identifier.encode())


def main():
    archive, kek_id = sys.argv[1], sys.argv[2]
    no_key = "--no-key" in sys.argv
    keks = {kek_id: bytes.fromhex(os.environ["STRATA_KEK"])}
    factory = pe.CryptoFactory(lambda config: StrataKmsClient(keks))
    out = {}
    manifests = os.path.join(archive, "manifests")
    for table in sorted(os.listdir(manifests)):
        for name in sorted(os.listdir(os.path.join(manifests, table))):
            with open(os.path.join(manifests, table, name)) as f:
                manifest = json.load(f)
            for entry in manifest["files"]:
                path = os.path.join(archive, entry["path"])
                if no_key:
                    try:
                        pq.read_table(path)
                        out[entry["path"]] = "READ WITHOUT KEY"
                    except Exception as e:  # noqa: BLE001 - any failure is the expected outcome
                        out[entry["path"]] = str(e)
                else:
                    # Key material is stored beside each file (Parquet external key material).
                    decryption = factory.file_decryption_properties(
                        pe.KmsConnectionConfig(), pe.DecryptionConfiguration(), path, pafs.LocalFileSystem()
                    )
                    table_read = pq.read_table(path, decryption_properties=decryption)
                    assert table_read.column_names[0] == "_strata_patient", table_read.column_names
                    out[entry["path"]] = table_read.num_rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
