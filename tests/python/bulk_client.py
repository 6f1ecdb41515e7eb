"""A FHIR Bulk Data client written from the specifications' text, independent of the server.

- SMART App Launch 2.0, Backend Services: discovery (.well-known/smart-configuration), a client
  assertion (RFC 7523 JWT: iss = sub = client id, aud = the token endpoint, exp <= 5 minutes,
  a fresh jti; RS384 or ES384 with the registered key's kid), exchanged with
  grant_type=client_credentials for an access token.
- FHIR Bulk Data Access 2.0: kick-off (GET [base]/$export, Patient/$export or
  Group/[id]/$export; Accept: application/fhir+json; Prefer: respond-async) -> 202 with
  Content-Location; polling -> 202 (X-Progress, Retry-After) until 200 with the completion
  manifest; each output file fetched with the access token (requiresAccessToken) as NDJSON.

Every NDJSON line is validated with fhir.resources (R4B models, R4's structure). A second check,
independent of Strata's scanner, looks for direct identifiers: name, telecom, identifier or
street address elements, SSN / phone / e-mail / IP-like text, and (with --years-only) any date
element more precise than a year.

Usage: bulk_client.py --base URL --ca CERT --client-id ID --key PEM --kid KID --alg ES384
         [--group ID] [--type T,T] [--type-filter F] [--out DIR] [--years-only]
Prints a JSON summary; exits 1 when the export, a validation or the identifier check fails.
"""
import argparse
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import jwt
from fhir.resources.R4B import get_fhir_model_class

# Elements that would carry a direct identifier; a de-identified export has none of them.
FORBIDDEN_ELEMENTS = {"name", "telecom", "identifier", "line", "photo", "contact"}
TEXT_PATTERNS = {
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "phone": re.compile(r"\(?\b\d{3}\)?[-. ]\d{3}[-. ]\d{4}\b"),
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+"),
    "ip": re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b"),
}
DATE_ELEMENTS = {
    "birthDate", "deceasedDateTime", "effectiveDateTime", "recordedDate", "onsetDateTime",
    "performedDateTime", "start", "end", "issued", "date", "authoredOn",
}


class Client:
    def __init__(self, base, ca):
        self.base = base.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca)
        self.token = None

    def request(self, method, url, headers=None, body=None):
        req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, context=self.ctx) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def authorize(self, client_id, key_pem, kid, alg, scope):
        status, _, body = self.request("GET", f"{self.base}/.well-known/smart-configuration")
        assert status == 200, f"discovery: {status}"
        config = json.loads(body)
        assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
        assert alg in config["token_endpoint_auth_signing_alg_values_supported"]
        token_url = config["token_endpoint"]
        now = int(time.time())
        assertion = jwt.encode(
            {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + 240,
             "jti": str(uuid.uuid4())},
            key_pem, algorithm=alg, headers={"kid": kid, "typ": "JWT"},
        )
        form = urllib.parse.urlencode({
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }).encode()
        status, _, body = self.request(
            "POST", token_url, {"Content-Type": "application/x-www-form-urlencoded"}, form)
        assert status == 200, f"token: {status} {body!r}"
        answer = json.loads(body)
        assert answer["token_type"].lower() == "bearer" and answer["expires_in"] > 0
        self.token = answer["access_token"]
        return answer

    def export(self, path, params):
        url = f"{self.base}/fhir/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, headers, body = self.request(
            "GET", url, {"Accept": "application/fhir+json", "Prefer": "respond-async"})
        assert status == 202, f"kick-off: {status} {body!r}"
        location = headers.get("Content-Location")
        assert location, "kick-off: no Content-Location"
        progress = []
        for _ in range(600):
            status, headers, body = self.request("GET", location)
            if status == 202:
                progress.append(headers.get("X-Progress"))
                time.sleep(min(float(headers.get("Retry-After", "1")), 1.0))
                continue
            assert status == 200, f"status: {status} {body!r}"
            manifest = json.loads(body)
            for field in ("transactionTime", "request", "requiresAccessToken", "output"):
                assert field in manifest, f"manifest: no {field}"
            return manifest, progress
        raise AssertionError("the export did not finish")


def walk(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v, key)
    else:
        yield key, value


def violations_of(resource, years_only):
    found = []

    def keys(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys(v)

    for k in keys(resource):
        if k in FORBIDDEN_ELEMENTS:
            found.append(f"element {k}")
    for key, value in walk(resource):
        if not isinstance(value, str) or key in ("system", "url", "reference", "id"):
            continue
        for rule, pattern in TEXT_PATTERNS.items():
            if pattern.search(value):
                found.append(f"{key}: {rule}")
        if years_only and key in DATE_ELEMENTS and len(value) > 4:
            found.append(f"{key}: more than a year")
    return found


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--base", required=True)
    a.add_argument("--ca", required=True)
    a.add_argument("--client-id", required=True)
    a.add_argument("--key", required=True)
    a.add_argument("--kid", required=True)
    a.add_argument("--alg", default="ES384")
    a.add_argument("--scope", default="system/*.read")
    a.add_argument("--group")
    a.add_argument("--type")
    a.add_argument("--type-filter", action="append")
    a.add_argument("--out", default=".")
    a.add_argument("--years-only", action="store_true")
    args = a.parse_args()

    client = Client(args.base, args.ca)
    with open(args.key) as f:
        key = f.read()
    granted = client.authorize(args.client_id, key, args.kid, args.alg, args.scope)
    params = []
    if args.type:
        params.append(("_type", args.type))
    for f in args.type_filter or []:
        params.append(("_typeFilter", f))
    path = f"Group/{args.group}/$export" if args.group else "Patient/$export"
    manifest, progress = client.export(path, params)
    assert manifest["requiresAccessToken"] is True

    counts, violations, lines = {}, [], 0
    os.makedirs(args.out, exist_ok=True)
    for item in manifest["output"]:
        status, headers, body = client.request("GET", item["url"], {"Accept": "application/fhir+ndjson"})
        assert status == 200, f"{item['url']}: {status}"
        name = os.path.basename(urllib.parse.urlparse(item["url"]).path)
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(body)
        n = 0
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            resource = json.loads(line)
            assert resource["resourceType"] == item["type"], f"{name}: a {resource['resourceType']}"
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            violations += [f"{item['type']}: {v}" for v in violations_of(resource, args.years_only)]
            n += 1
        assert n == item.get("count", n), f"{name}: {n} lines, the manifest says {item.get('count')}"
        counts[item["type"]] = counts.get(item["type"], 0) + n
        lines += n
    # Without a token, a file is not served (requiresAccessToken).
    token, client.token = client.token, None
    unauthorized = client.request("GET", manifest["output"][0]["url"])[0] if manifest["output"] else 401
    client.token = token
    summary = {
        "scope": granted["scope"],
        "counts": counts,
        "lines": lines,
        "progress_seen": len([p for p in progress if p]),
        "violations": violations[:20],
        "file_without_token": unauthorized,
        "transactionTime": manifest["transactionTime"],
        "request": manifest["request"],
    }
    print(json.dumps(summary))
    sys.exit(1 if violations or unauthorized != 401 else 0)


if __name__ == "__main__":
    main()
