"""Validates FHIR R4 Bundles with fhir.resources (the R4B models: R4's structure and rules).

Usage: validate_fhir.py < bundle.json
Prints {"ResourceType": count, ...} for a valid Bundle; exits 1 with the validation errors
otherwise.
"""
import collections
import json
import sys

from fhir.resources.R4B.bundle import Bundle


def main():
    data = json.load(sys.stdin)
    try:
        bundle = Bundle.model_validate(data)
    except Exception as e:  # noqa: BLE001 - the validator's message is the answer
        print(str(e), file=sys.stderr)
        sys.exit(1)
    counts = collections.Counter(e.resource.__resource_type__ for e in bundle.entry or [])
    print(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
