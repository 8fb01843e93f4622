"""Validate vouch's provenance with an independent implementation: in-toto's own Python
bindings (PyPI `in-toto-attestation`, protobuf). Strict protobuf JSON parsing refuses unknown
fields, a `content` that is not base64 and malformed timestamps; the Statement and every
ResourceDescriptor are then validated by the package. Usage: provenance_slsa.py FILE (JSON Lines).
"""
import json
import sys

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

SIZES = {"REPORT_DATA": 64, "HOST_DATA": 32}

for line in open(sys.argv[1]):
    if not line.strip():
        continue
    doc = json.loads(line)
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
