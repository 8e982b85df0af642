#!/usr/bin/env python3
"""Pulls an image's manifest and every blob with oras-py (the ORAS project's Python client), as
tests/tests/token_clients.rs runs it: `oras_pull.py <host:port> <name>:<tag>`, with `ORAS_USER` and
`ORAS_PASSWORD` for a login first. Checks every blob's digest; prints {"manifest_digest", "blobs"}
as JSON on success, exits 1 with the error on stderr otherwise."""
import hashlib
import json
import os
import sys
import tempfile

import oras.client


def main() -> int:
    host, ref = sys.argv[1], sys.argv[2]
    target = f"{host}/{ref}"
    client = oras.client.OrasClient(hostname=host, insecure=True, tls_verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        if os.environ.get("ORAS_USER"):
            client.login(username=os.environ["ORAS_USER"], password=os.environ.get("ORAS_PASSWORD", ""),
                         hostname=host, tls_verify=False, config_path=os.path.join(tmp, "config.json"))
        manifest = client.get_manifest(target)
        blobs = []
        for desc in [manifest["config"], *manifest["layers"]]:
            out = os.path.join(tmp, desc["digest"].replace(":", "_"))
            client.download_blob(target, desc["digest"], out)
            with open(out, "rb") as f:
                got = "sha256:" + hashlib.sha256(f.read()).hexdigest()
            if got != desc["digest"]:
                print(f"blob {desc['digest']} came back as {got}", file=sys.stderr)
                return 1
            blobs.append(got)
    print(json.dumps({"layers": len(manifest["layers"]), "blobs": blobs}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the test reads the error
        print(f"oras: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
