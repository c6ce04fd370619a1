#!/usr/bin/env python3
"""Generate the signing test vectors in tests/data/signedjson/ from Synapse's libraries.

courier's canonical JSON, JSON signatures and X-Matrix headers must be byte-identical
to what Synapse produces. Synapse does all three with two small libraries,
`canonicaljson` and `signedjson`; this script runs them over a fixed set of inputs and
writes the results for tests/signing_vectors.rs to compare against.

Rerun (from the repository root):

    python3 -m venv /tmp/sjvenv
    /tmp/sjvenv/bin/pip install signedjson canonicaljson
    /tmp/sjvenv/bin/python tools/gen_signedjson_vectors.py

The output is deterministic (fixed inputs, fixed keys, a seeded RNG for the float
table), so rerunning with the same library versions leaves the files unchanged. The
versions used are recorded in each file under "versions". Check in the result.

Files written:
  tests/data/signedjson/vectors.json  canonical forms, signed objects, X-Matrix requests
  tests/data/signedjson/floats.json   Python float formatting (repr) for many doubles
"""

import copy
import importlib.metadata
import json
import math
import os
import platform
import random
import struct
import sys

from canonicaljson import encode_canonical_json
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, get_verify_key
from signedjson.sign import sign_json, verify_signed_json
from unpaddedbase64 import encode_base64

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "signedjson")

# The spec's test-vector key (appendix "Cryptographic Test Vectors").
SPEC_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SPEC_ENTITY = "domain"
SPEC_VERSION = "1"

# A second key for X-Matrix requests: seed bytes 0..31, a Synapse-style version.
OTHER_SEED = encode_base64(bytes(range(32)))
OTHER_VERSION = "a_AbCd"

# JSON inputs, as JSON text (so exact source spellings like "\u65E5" are kept).
# mode "strict": integers within +-(2**53-1) only, so the spec's canonical form and
#                Synapse's are the same and courier's NumberMode::Strict must match.
# mode "python": floats or out-of-range integers; only NumberMode::Python matches.
JSON_INPUTS = [
    # Spec appendix, "Canonical JSON" examples.
    ("spec_empty", "strict", "{}"),
    ("spec_one_two", "strict", '{"one": 1, "two": "Two"}'),
    ("spec_reorder", "strict", '{"b": "2", "a": "1"}'),
    (
        "spec_auth",
        "strict",
        """{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {
            "display_name": "John Doe", "three_pids": [
              {"medium": "email", "address": "john.doe@example.org"},
              {"medium": "msisdn", "address": "123456789"}]}}}""",
    ),
    ("spec_japanese_value", "strict", '{"a": "\u65e5\u672c\u8a9e"}'),
    ("spec_japanese_keys", "strict", '{"\u672c": 2, "\u65e5": 1}'),
    ("spec_escaped_value", "strict", '{"a": "\\u65E5"}'),
    ("spec_null", "strict", '{"a": null}'),
    # Python reads -0 as int 0 and 1e10 as the float 10000000000.0, so this spec
    # example does not give the spec's output under canonicaljson. See
    # tests/signing_vectors.rs for how courier differs.
    ("spec_minus_zero_exponent", "python", '{"a": -0, "b": 1e10}'),
    # Nesting, arrays, empty containers.
    (
        "nested",
        "strict",
        '{"z": {"y": {"x": [3, 2, 1, {"b": [], "a": {}}]}}, "a": [[], [[]], {}], "m": {"": ""}}',
    ),
    ("empty_containers", "strict", '{"a": [], "b": {}, "c": [{}], "d": [[]], "e": ""}'),
    ("literals", "strict", '{"t": true, "f": false, "n": null, "s": "null", "arr": [true, false, null]}'),
    # Unicode: BMP, astral plane, and characters the spec writes raw.
    (
        "unicode",
        "strict",
        '{"bmp": "caf\\u00e9 \\u00df \\u4e2d", "astral": "\\ud83d\\ude00 \\ud834\\udd1e \\udbff\\udfff", '
        '"raw": "/ \\/ \\u007f \\u0080 \\u2028 \\u2029 \\ufeff \\uffff"}',
    ),
    (
        "unicode_keys",
        "strict",
        '{"\\ud800\\udc00": 1, "\\uff61": 2, "a": 3, "A": 4, "": 5, "aa": 6, "\\u00e9": 7, "\\u007f": 8, " ": 9}',
    ),
    # Escapes and control characters.
    (
        "escapes",
        "strict",
        '{"short": "\\b\\t\\n\\f\\r\\"\\\\", '
        '"controls": "\\u0000\\u0001\\u0002\\u0007\\u000b\\u000e\\u000f\\u0010\\u001b\\u001f", '
        '"\\n\\u0000": "key with controls", "quote\\"key": "\\\\"}',
    ),
    # Integers at and inside the canonical range.
    (
        "int_limits",
        "strict",
        '{"max": 9007199254740991, "min": -9007199254740991, "zero": 0, "one": 1, "neg": -1, '
        '"ts": 1700000000000}',
    ),
    # Integers beyond the canonical range: Synapse writes them as-is.
    (
        "int_beyond",
        "python",
        '{"over": 9007199254740992, "under": -9007199254740992, '
        '"i64min": -9223372036854775808, "u64max": 18446744073709551615}',
    ),
    # Floats, signed the way Synapse signs them (repr).
    ("floats_brief", "python", '{"f": 1.5, "g": 1e16, "h": -0.0, "i": 1e-7}'),
    (
        "floats_more",
        "python",
        '{"a": 0.1, "b": 1e22, "c": 1.234e-5, "d": 10000000000.0, "e": 0.0001, "f": 0.00001, '
        '"g": 123456789012345680.0, "h": 5e-324, "i": 1.7976931348623157e308, "j": 2.0, '
        '"k": [1.0, -1.5, 3.141592653589793], "l": 1e15, "m": 1e16, "n": 9999999999999998.0}',
    ),
    # A realistic to-device transaction.
    (
        "transaction",
        "strict",
        '{"origin": "domain", "origin_server_ts": 1700000000000, "pdus": [], "edus": [{'
        '"edu_type": "m.direct_to_device", "content": {"sender": "@alice:domain", '
        '"type": "m.room_key_request", "message_id": "hiezohf6Hoo7kaev", "messages": {'
        '"@bob:remote.example": {"IWHQUZUIAH": {"action": "request", "request_id": "r1", '
        '"requesting_device_id": "DEV", "body": {"algorithm": "m.megolm.v1.aes-sha2", '
        '"room_id": "!room:domain", "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ"}}}}}}]}',
    ),
    # Objects that already carry signatures and unsigned data.
    (
        "existing_signatures",
        "strict",
        '{"a": 1, "unsigned": {"age": 5, "x": [1]}, "signatures": {"other.example": {"ed25519:x": "abc"}, '
        '"domain": {"ed25519:0": "old"}}}',
    ),
]

# X-Matrix requests: (name, mode, method, uri, origin, destination, content JSON text or None, key)
REQUESTS = [
    ("get_version", "strict", "GET", "/_matrix/federation/v1/version", "domain", "remote.example", None, "spec"),
    (
        "get_query_string",
        "strict",
        "GET",
        "/_matrix/federation/v1/query/profile?user_id=%40alice%3Adomain&field=displayname",
        "domain",
        "remote.example",
        None,
        "spec",
    ),
    (
        "put_send",
        "strict",
        "PUT",
        "/_matrix/federation/v1/send/1700000000000",
        "origin.example",
        "destination.example:8448",
        '{"origin": "origin.example", "origin_server_ts": 1700000000000, "pdus": [], "edus": ['
        '{"edu_type": "m.direct_to_device", "content": {"sender": "@a:origin.example", "type": "m.test", '
        '"message_id": "m1", "messages": {"@b:destination.example:8448": {"*": {"k": "v \\u2028 \\ud83d\\ude00"}}}}}]}',
        "other",
    ),
    (
        "post_empty_body",
        "strict",
        "POST",
        "/_matrix/key/v2/query",
        "domain",
        "notary.example",
        "{}",
        "spec",
    ),
    (
        "put_send_floats",
        "python",
        "PUT",
        "/_matrix/federation/v1/send/txn%2F2?x=1",
        "domain",
        "remote.example",
        '{"origin": "domain", "origin_server_ts": 1, "pdus": [], "edus": [{"edu_type": "m.direct_to_device", '
        '"content": {"sender": "@a:domain", "type": "m.test", "message_id": "m2", '
        '"messages": {"@b:remote.example": {"D": {"f": 1.5, "g": 1e16, "h": -0.0, "i": 1e-7}}}}}]}',
        "spec",
    ),
]


def load_key(seed_b64, version):
    return decode_signing_key_base64("ed25519", version, seed_b64)


def canonical_text(obj):
    return encode_canonical_json(obj).decode("utf-8")


def json_vectors(key):
    out = []
    for name, mode, text in JSON_INPUTS:
        obj = json.loads(text)
        signed = sign_json(copy.deepcopy(obj), SPEC_ENTITY, key)
        verify_signed_json(signed, SPEC_ENTITY, get_verify_key(key))
        out.append(
            {
                "name": name,
                "mode": mode,
                "input": text,
                "canonical": canonical_text(obj),
                "signed": canonical_text(signed),
                "signature": signed["signatures"][SPEC_ENTITY]["ed25519:" + SPEC_VERSION],
            }
        )
    return out


def request_vectors(keys):
    out = []
    for name, mode, method, uri, origin, destination, content, key_name in REQUESTS:
        key = keys[key_name]
        # Exactly the object in the spec's sample code and Synapse's
        # MatrixFederationHttpClient.build_auth_headers.
        request = {"method": method, "uri": uri, "origin": origin, "destination": destination}
        if content is not None:
            request["content"] = json.loads(content)
        signed_bytes = canonical_text(request)
        sign_json(request, origin, key)
        key_id = "ed25519:" + key.version
        sig = request["signatures"][origin][key_id]
        # Synapse's header: origin, key, sig, destination (in that order).
        header = 'X-Matrix origin="%s",key="%s",sig="%s",destination="%s"' % (origin, key_id, sig, destination)
        out.append(
            {
                "name": name,
                "mode": mode,
                "method": method,
                "uri": uri,
                "origin": origin,
                "destination": destination,
                "content": content,
                "signed_bytes": signed_bytes,
                "key_id": key_id,
                "verify_key": encode_verify_key_base64(get_verify_key(key)),
                "header": header,
            }
        )
    return out


def float_vectors():
    """(input JSON number text, json.dumps output) pairs over many magnitudes.

    Inputs are written with 17 significant digits ("%.17g"), which is generally NOT
    the shortest form, so the test exercises choosing the shortest digits as well as
    the layout (fixed vs exponent).
    """
    rng = random.Random(20261125)
    values = set()
    # Every power of ten and its neighbours across the fixed/exponent boundaries.
    for e in range(-330, 310):
        for m in (1.0, 9.999999999999999):
            v = m * 10.0**e if -300 < e < 300 else float("%se%d" % (m, e))
            if math.isfinite(v):
                values.add(v)
    # Random bit patterns: all exponents, subnormals included.
    while len(values) < 1900:
        (v,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if math.isfinite(v):
            values.add(v)
    # Everyday magnitudes.
    for _ in range(300):
        values.add(rng.uniform(-1e6, 1e6))
        values.add(round(rng.uniform(0, 1000), rng.randint(0, 6)))
    values.update([0.0, -0.0, 0.1, 0.2, 0.3, 1 / 3, 2 / 3, 100.0, 1e16, 1e-5, 1e-4, 5e-324, 2.2250738585072014e-308])
    out = []
    for v in sorted(values, key=lambda x: (x, math.copysign(1, x))):
        text = "%.17g" % v
        # Keep it a float literal: JSON readers (serde_json, Python) read "100" as an
        # integer. "%.17g" may give "1.0000000000000000e+17"; that is valid JSON.
        if not any(c in text for c in ".eE"):
            text += ".0"
        assert float(text) == v and math.copysign(1, float(text)) == math.copysign(1, v)
        out.append([text, json.dumps(v)])
    return out


def versions():
    return {
        "python": platform.python_version(),
        "signedjson": importlib.metadata.version("signedjson"),
        "canonicaljson": importlib.metadata.version("canonicaljson"),
        "pynacl": importlib.metadata.version("pynacl"),
        "unpaddedbase64": importlib.metadata.version("unpaddedbase64"),
    }


def write(name, data):
    path = os.path.normpath(os.path.join(OUT_DIR, name))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write("\n")
    print("wrote", path, file=sys.stderr)


def write_floats(name, header, pairs):
    """Like write(), but one [input, output] pair per line to keep diffs readable."""
    path = os.path.normpath(os.path.join(OUT_DIR, name))
    head = json.dumps(header, ensure_ascii=False, indent=1)
    lines = ",\n".join("  " + json.dumps(pair) for pair in pairs)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(head[:-2] + ',\n "floats": [\n' + lines + "\n ]\n}\n")
    print("wrote", path, file=sys.stderr)


def main():
    spec_key = load_key(SPEC_SEED, SPEC_VERSION)
    other_key = load_key(OTHER_SEED, OTHER_VERSION)
    assert encode_verify_key_base64(get_verify_key(spec_key)) == "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
    os.makedirs(OUT_DIR, exist_ok=True)
    header = {
        "generator": "tools/gen_signedjson_vectors.py (see its docstring to rerun)",
        "versions": versions(),
    }
    write(
        "vectors.json",
        {
            **header,
            "signing_key": {
                "seed": SPEC_SEED,
                "entity": SPEC_ENTITY,
                "key_id": "ed25519:" + SPEC_VERSION,
                "verify_key": encode_verify_key_base64(get_verify_key(spec_key)),
            },
            "json": json_vectors(spec_key),
            "requests": request_vectors({"spec": spec_key, "other": other_key}),
        },
    )
    write_floats("floats.json", header, float_vectors())


if __name__ == "__main__":
    main()
