"""Validate vouch's provenance with an independent implementation: in-toto's own Python
bindings (PyPI `in-toto-attestation`, protobuf). Strict protobuf JSON parsing refuses unknown
fields, a `content` that is not base64 and malformed timestamps; the Statement and every
ResourceDescriptor are then validated by the package. Usage: provenance_slsa.py FILE (JSON Lines
of statements), or provenance_slsa.py --dsse FILE NAME:KEY (JSON Lines of DSSE envelopes: each
signature by the Nix key NAME:KEY is checked over DSSE's pre-authentication encoding with
`cryptography`'s Ed25519, then the payload validated as above).
"""
import base64
import json
import sys

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

SIZES = {"REPORT_DATA": 64, "HOST_DATA": 32}



def docs():
    """The statements of the file, each envelope's signature checked first with --dsse."""
    if sys.argv[1] != "--dsse":
        for line in open(sys.argv[1]):
            if line.strip():
                yield json.loads(line)
        return
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    name, key = sys.argv[3].split(":", 1)
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
    for line in open(sys.argv[2]):
        if not line.strip():
            continue
        env = json.loads(line)
        ptype = env["payloadType"].encode()
        body = base64.b64decode(env["payload"])
        pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(body), body)
        sigs = [s for s in env["signatures"] if s["keyid"] == name]
        assert sigs, "no signature by " + name
        for s in sigs:
            public.verify(base64.b64decode(s["sig"]), pae)  # raises InvalidSignature
        yield json.loads(body)


for doc in docs():
    Statement.copy_from_pb(json_format.ParseDict(doc, statement_pb2.Statement())).validate()
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1", doc["predicateType"]
    prov = json_format.ParseDict(doc["predicate"], provenance_pb2.Provenance())
    rds = list(prov.build_definition.resolved_dependencies) + list(prov.run_details.byproducts)
    for rd in rds:
        ResourceDescriptor.copy_from_pb(rd).validate()
    for b in prov.run_details.byproducts:
        if b.name in SIZES:
            assert len(b.content) == SIZES[b.name], (b.name, len(b.content))
    assert prov.build_definition.build_type, "buildType"
    assert prov.run_details.builder.id, "builder.id"
    meta = prov.run_details.metadata
    assert meta.HasField("started_on") and meta.HasField("finished_on"), "startedOn, finishedOn"
    assert meta.started_on.seconds <= meta.finished_on.seconds
    print("ok", doc["subject"][0]["name"], prov.run_details.builder.id)
