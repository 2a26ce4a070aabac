"""``warmstart publish``, ``versions`` and ``alias``: a function's published versions and
its aliases, over the node's Lambda API.

``warmstart invoke NAME:QUALIFIER`` runs a version or an alias (the path takes it, as
Lambda's does).  ``alias`` creates an alias or moves it; ``--weight VERSION=SHARE`` sends
that share of its invocations to a second version (a canary), ``--weight none`` clears it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from warmstart.cli.client import CLIError, check, client

API = "/2015-03-31/functions"


def add_parsers(sub: Any) -> list[argparse.ArgumentParser]:
    """The commands' parsers (the caller gives each the usual ``--endpoint``)."""
    p = sub.add_parser(
        "publish",
        help="publish a function's $LATEST as a new version",
        description="Publish $LATEST as an immutable, numbered version (an unchanged $LATEST "
        "gives the newest version back, as Lambda does).",
    )
    p.add_argument("name", help="function name")
    p.add_argument(
        "--description", default=None, help="the version's description (default: $LATEST's)"
    )
    v = sub.add_parser(
        "versions",
        help="list a function's versions and aliases",
        description="One line per version ($LATEST first), then one per alias, tab-separated.",
    )
    v.add_argument("name", help="function name")
    a = sub.add_parser(
        "alias",
        help="create an alias or point it at another version",
        description="Create ALIAS for VERSION, or move it there. With --weight V=SHARE, "
        "SHARE (0 to 1) of its invocations run version V instead.",
    )
    a.add_argument("name", help="function name")
    a.add_argument("alias", help="alias name")
    a.add_argument("version", help="a version number or $LATEST")
    a.add_argument(
        "--weight",
        default=None,
        metavar="V=SHARE",
        help="route SHARE of the invocations to version V; 'none' clears a split "
        "(default: keep the alias's split, none for a new alias)",
    )
    return [p, v, a]


def _routing(weight: str | None) -> dict[str, Any] | None:
    if weight is None:
        return None
    if weight == "none":
        return {"AdditionalVersionWeights": {}}
    version, sep, share = weight.partition("=")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if not sep or not version or not 0.0 <= value <= 1.0:
        raise CLIError(f"--weight takes VERSION=SHARE with SHARE between 0 and 1, not {weight!r}")
    return {"AdditionalVersionWeights": {version: value}}


def publish(args: argparse.Namespace) -> int:
    body = {} if args.description is None else {"Description": args.description}
    with client(args) as c:
        out = check(c.post(f"{API}/{args.name}/versions", json=body)).json()
    print(f"{args.name} version {out['Version']} ({out['CodeSha256']})")
    return 0


def versions(args: argparse.Namespace) -> int:
    with client(args) as c:
        listed = check(c.get(f"{API}/{args.name}/versions", params={"MaxItems": 50})).json()
        found = listed["Versions"]
        while listed.get("NextMarker"):
            params = {"MaxItems": 50, "Marker": listed["NextMarker"]}
            listed = check(c.get(f"{API}/{args.name}/versions", params=params)).json()
            found += listed["Versions"]
        aliases = check(c.get(f"{API}/{args.name}/aliases", params={"MaxItems": 10000})).json()
    print("version\tcode sha256\tlast modified\tdescription")
    for v in found:
        print(f"{v['Version']}\t{v['CodeSha256']}\t{v['LastModified']}\t{v['Description']}")
    for alias in aliases["Aliases"]:
        weights = alias.get("RoutingConfig", {}).get("AdditionalVersionWeights", {})
        split = "".join(f" + {share:g} to {version}" for version, share in weights.items())
        print(f"alias {alias['Name']}\t-> {alias['FunctionVersion']}{split}")
    return 0


def alias(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"FunctionVersion": args.version}
    routing = _routing(args.weight)
    if routing is not None:
        body["RoutingConfig"] = routing
    with client(args) as c:
        resp = c.put(f"{API}/{args.name}/aliases/{args.alias}", json=body)
        if resp.status_code == 404 and "Alias not found" in resp.text:
            resp = c.post(f"{API}/{args.name}/aliases", json={"Name": args.alias, **body})
        out = check(resp).json()
    print(json.dumps(out))
    return 0
